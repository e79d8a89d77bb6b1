/* guided forward MODEL IN.safetensors OUT.safetensors
 * Reads x, t (and y) from IN; writes `out` for a U-Net, or `logits` and `grad`
 * (d/dx sum_i log_softmax(logits_i)[y_i]) for a classifier. */
#include "guided.h"
#include "gd-error.h"
#include "gd-model.h"
#include "gd-safetensors.h"

#include <stdio.h>
#include <string.h>

static gboolean
read_labels (const GdSafetensors *in, const char *name, int n, int64_t **out, GError **error)
{
  const GdStTensor *t = gd_safetensors_find (in, name);
  *out = NULL;
  if (!t)
    return TRUE;
  if (t->ndim != 1 || t->shape[0] != n)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s: '%s' must have shape [%d]",
                   gd_safetensors_path (in), name, n);
      return FALSE;
    }
  if (!gd_st_tensor_to_i64 (t, out, error))
    {
      g_prefix_error (error, "%s: ", gd_safetensors_path (in));
      return FALSE;
    }
  return TRUE;
}

static int
run (const char *model_path, const char *config, const char *in_path, const char *out_path,
     GError **error)
{
  GdModel *model = NULL;
  GdSafetensors *in = NULL;
  float *x = NULL, *result = NULL, *grad = NULL;
  int64_t *t = NULL, *y = NULL;
  int status = 1;

  model = guided_load_model (model_path, config, error);
  if (!model)
    goto out;
  in = gd_safetensors_open (in_path, error);
  if (!in)
    goto out;
  const GdStTensor *xt = gd_safetensors_find (in, "x");
  if (!xt || xt->ndim != 4)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s: needs a 4-D tensor 'x' [N, C, H, W]", in_path);
      goto out;
    }
  int n = (int) xt->shape[0], c = (int) xt->shape[1], h = (int) xt->shape[2], w = (int) xt->shape[3];
  if (!gd_safetensors_find (in, "t"))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s: needs a tensor 't' of %d timesteps", in_path, n);
      goto out;
    }
  if (!read_labels (in, "t", n, &t, error) || !read_labels (in, "y", n, &y, error))
    goto out;
  const GdModelConfig *cfg = gd_model_get_config (model);
  if (!gd_model_check_input (model, n, c, h, w, cfg->kind == GD_MODEL_UNET ? y : NULL, error))
    goto out;
  x = gd_st_tensor_to_f32 (xt);

  GdStWriter *writer = gd_st_writer_new ();
  if (cfg->kind == GD_MODEL_UNET)
    {
      result = g_new (float, (size_t) n * cfg->out_channels * h * w);
      gd_model_set_inference (model, TRUE);
      if (!gd_model_forward (model, x, n, h, w, t, y, result, error))
        {
          gd_st_writer_free (writer);
          goto out;
        }
      int64_t shape[4] = { n, cfg->out_channels, h, w };
      gd_st_writer_add (writer, "out", GD_DTYPE_F32, 4, shape, result);
    }
  else
    {
      result = g_new (float, (size_t) n * cfg->out_channels);
      int64_t logits_shape[2] = { n, cfg->out_channels };
      if (y)
        {
          grad = g_new (float, (size_t) n * c * h * w);
          if (!gd_classifier_gradient (model, x, n, h, w, t, y, result, grad, error))
            {
              gd_st_writer_free (writer);
              goto out;
            }
          gd_st_writer_add (writer, "logits", GD_DTYPE_F32, 2, logits_shape, result);
          int64_t shape[4] = { n, c, h, w };
          gd_st_writer_add (writer, "grad", GD_DTYPE_F32, 4, shape, grad);
        }
      else
        {
          if (!gd_model_forward (model, x, n, h, w, t, NULL, result, error))
            {
              gd_st_writer_free (writer);
              goto out;
            }
          gd_st_writer_add (writer, "logits", GD_DTYPE_F32, 2, logits_shape, result);
          fprintf (stderr, "guided forward: %s has no labels 'y': writing logits without 'grad'\n",
                   in_path);
        }
    }
  gboolean written = gd_st_writer_write (writer, out_path, error);
  gd_st_writer_free (writer);
  status = written ? 0 : 1;

out:
  g_free (x);
  g_free (t);
  g_free (y);
  g_free (result);
  g_free (grad);
  gd_safetensors_free (in);
  gd_model_free (model);
  return status;
}

int
guided_forward_main (int argc, char **argv)
{
  if (argc == 2 && (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0))
    {
      printf ("usage: guided forward [--config JSON|FILE] MODEL IN.safetensors OUT.safetensors\n\n"
              "Runs MODEL on the tensors x [N, C, H, W], t [N] (timesteps as the network\n"
              "receives them) and, when present, y [N] (class labels) of IN, and writes OUT:\n"
              "  a U-Net:      out [N, out_channels, H, W]\n"
              "  a classifier: logits [N, classes] and, when y is given,\n"
              "                grad = d/dx sum_i log_softmax(logits_i)[y_i]  [N, C, H, W]\n"
              "MODEL is a .safetensors or .pt file; --config overrides what a .pt file's\n"
              "weights leave open (docs/checkpoints.md).\n");
      return 0;
    }
  const char *config = NULL;
  if (argc == 6 && strcmp (argv[1], "--config") == 0)
    {
      config = argv[2];
      argc -= 2;
      argv += 2;
    }
  if (argc != 4)
    {
      fprintf (stderr, "usage: guided forward [--config JSON|FILE] MODEL IN.safetensors OUT.safetensors\n");
      return 2;
    }
  GError *error = NULL;
  int status = run (argv[1], config, argv[2], argv[3], &error);
  if (error)
    {
      fprintf (stderr, "guided forward: %s\n", error->message);
      g_error_free (error);
    }
  return status;
}
