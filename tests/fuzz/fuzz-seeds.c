/* Writes the starting corpora of the fuzz targets into DIR/pickle, DIR/torch and
 * DIR/safetensors: small checkpoints of every layout and dtype, a guided-diffusion
 * U-Net's key list (broadcast views, so the file stays small), their pickles, and
 * safetensors headers with model metadata. */
#include "gd-model.h"
#include "gd-safetensors.h"
#include "pt-writer.h"

#include <glib/gstdio.h>
#include <stdio.h>
#include <string.h>

static void
save (const char *dir, const char *name, GBytes *bytes)
{
  char *path = g_build_filename (dir, name, NULL);
  GError *error = NULL;
  if (!pt_write_file (path, bytes, &error))
    g_error ("%s", error->message);
  g_free (path);
}

static PtWriter *
mixed_writer (void)
{
  static const float f32[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
  static const guint16 f16[2] = { 0x3c00, 0xc000 };
  static const guint16 bf16[2] = { 0x3f80, 0x4049 };
  static const double f64[2] = { 1.5, -2 };
  static const int64_t i64[2] = { 3, -4 };
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", f32, 8);
  pt_writer_add_tensor (w, "a", s, 1, 2, (int64_t[]) { 2, 3 }, NULL, TRUE);
  pt_writer_add_tensor (w, "b", s, 0, 2, (int64_t[]) { 3, 2 }, (int64_t[]) { 1, 3 }, FALSE);
  pt_writer_add_tensor (w, "c", pt_writer_add_storage (w, "HalfStorage", f16, 2), 0, 1, (int64_t[]) { 2 }, NULL, FALSE);
  pt_writer_add_tensor (w, "d", pt_writer_add_storage (w, "BFloat16Storage", bf16, 2), 0, 1, (int64_t[]) { 2 }, NULL, FALSE);
  pt_writer_add_tensor (w, "e", pt_writer_add_storage (w, "DoubleStorage", f64, 2), 1, 0, NULL, NULL, FALSE);
  pt_writer_add_tensor (w, "f", pt_writer_add_storage (w, "LongStorage", i64, 2), 0, 1, (int64_t[]) { 2 }, NULL, FALSE);
  return w;
}

/* A small class-conditional learned-sigma U-Net with attention, every tensor a
 * broadcast view of one element. */
static PtWriter *
unet_writer (void)
{
  static const float one = 1;
  GdModelConfig cfg;
  gd_model_config_init (&cfg, GD_MODEL_UNET);
  gd_model_config_parse (&cfg, "{\"image_size\": 16, \"model_channels\": 32, \"out_channels\": 6, "
                         "\"num_res_blocks\": 1, \"channel_mult\": [1, 2], \"attention_resolutions\": [2], "
                         "\"num_classes\": 10, \"num_head_channels\": 16, \"resblock_updown\": true, "
                         "\"use_scale_shift_norm\": true}", "seed", NULL);
  GdModel *model = gd_model_new (&cfg, "seed", NULL);
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", &one, 1);
  int64_t zeros[4] = { 0 };
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      const GdParam *p = gd_model_param (model, i);
      pt_writer_add_tensor (w, p->name, s, 0, p->ndim, p->shape, zeros, TRUE);
    }
  gd_model_free (model);
  return w;
}

int
main (int argc, char **argv)
{
  if (argc != 2)
    {
      fprintf (stderr, "usage: fuzz-seeds DIR\n");
      return 2;
    }
  static const char *layouts[] = { "aligned", "misaligned", "deflated", "legacy" };
  char *pickle_dir = g_build_filename (argv[1], "pickle", NULL);
  char *torch_dir = g_build_filename (argv[1], "torch", NULL);
  char *st_dir = g_build_filename (argv[1], "safetensors", NULL);
  g_mkdir_with_parents (pickle_dir, 0755);
  g_mkdir_with_parents (torch_dir, 0755);
  g_mkdir_with_parents (st_dir, 0755);
  PtWriter *writers[] = { mixed_writer (), unet_writer () };
  for (guint i = 0; i < G_N_ELEMENTS (writers); i++)
    {
      for (int layout = 0; layout < 4; layout++)
        {
          char *name = g_strdup_printf ("%u-%s.pt", i, layouts[layout]);
          GBytes *bytes = pt_writer_to_bytes (writers[i], (PtLayout) layout);
          save (torch_dir, name, bytes);
          if (layout == PT_LEGACY)
            save (pickle_dir, name, bytes);
          g_bytes_unref (bytes);
          g_free (name);
        }
      GByteArray *pickle = pt_writer_pickle (writers[i], FALSE);
      char *name = g_strdup_printf ("%u.pkl", i);
      GBytes *bytes = g_byte_array_free_to_bytes (pickle);
      save (pickle_dir, name, bytes);
      g_bytes_unref (bytes);
      g_free (name);
      pt_writer_free (writers[i]);
    }

  /* safetensors: a tensor of every dtype, and a classifier's metadata */
  static const float values[4] = { 1, 2, 3, 4 };
  GdStWriter *st = gd_st_writer_new ();
  gd_st_writer_add (st, "a", GD_DTYPE_F32, 2, (int64_t[]) { 2, 2 }, values);
  gd_st_writer_add (st, "b", GD_DTYPE_F16, 1, (int64_t[]) { 2 }, values);
  gd_st_writer_add (st, "c", GD_DTYPE_I64, 1, (int64_t[]) { 1 }, values);
  gd_st_writer_set_metadata (st, "kind", "classifier");
  gd_st_writer_set_metadata (st, "config", "{\"image_size\": 8, \"model_channels\": 32, "
                             "\"channel_mult\": [1], \"num_res_blocks\": 1, \"out_channels\": 2, "
                             "\"attention_resolutions\": [], \"pool\": \"adaptive\"}");
  char *path = g_build_filename (st_dir, "tensors.safetensors", NULL);
  if (!gd_st_writer_write (st, path, NULL))
    g_error ("cannot write %s", path);
  g_free (path);
  gd_st_writer_free (st);
  g_free (pickle_dir);
  g_free (torch_dir);
  g_free (st_dir);
  return 0;
}
