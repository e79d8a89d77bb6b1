/* guided-diffusion-gimp: the GIMP 2.10 plug-in.  One PDB procedure,
 * plug-in-guided-diffusion, under Filters > Render > Diffusion > Guided Diffusion...:
 * interactive (the dialog), with the last values (Filters > Repeat) and non-interactive
 * (Script-Fu, batch), all with the same parameters. */
#include "gd-gimp.h"
#include "gd-error.h"
#include "gd-parallel.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void query (void);
static void run (const gchar *name, gint nparams, const GimpParam *param, gint *nreturn_vals,
                 GimpParam **return_vals);

const GimpPlugInInfo PLUG_IN_INFO = { NULL, NULL, query, run };

static const GimpParamDef arguments[] = {
  { GIMP_PDB_INT32, "run-mode", "The run mode { RUN-INTERACTIVE (0), RUN-NONINTERACTIVE (1), RUN-WITH-LAST-VALS (2) }" },
  { GIMP_PDB_IMAGE, "image", "The image" },
  { GIMP_PDB_DRAWABLE, "drawable", "The layer to vary or inpaint (not used to generate)" },
  { GIMP_PDB_INT32, "mode", "{ GENERATE (0): new layers over the canvas or the selection bounds, VARY (1): the drawable noised to 'strength' and sampled back, INPAINT (2): the selection of the drawable regenerated }" },
  { GIMP_PDB_STRING, "model", "Diffusion model file (.safetensors or .pt); \"\" for the default model" },
  { GIMP_PDB_STRING, "classifier", "Noisy classifier file (.safetensors or .pt); \"\" for the default classifier, loaded only when guidance-scale is not 0" },
  { GIMP_PDB_STRING, "class-name", "Class to guide toward, by name from the classifier's (else the model's) label list, or its number when there is no list; \"\" draws a class per image from the seed" },
  { GIMP_PDB_FLOAT, "guidance-scale", "Scale of the classifier gradient (0: no guidance)" },
  { GIMP_PDB_INT32, "steps", "Sampling steps (1 to 10000)" },
  { GIMP_PDB_INT32, "sampler", "{ DDIM (0), DDPM (1) }" },
  { GIMP_PDB_FLOAT, "eta", "DDIM noise (0: deterministic)" },
  { GIMP_PDB_INT32, "seed", "Random seed, -1 for a new one; image j uses seed + j" },
  { GIMP_PDB_INT32, "n-images", "Images to make, one new layer each (1 to 64)" },
  { GIMP_PDB_FLOAT, "strength", "Vary and inpaint: the fraction of the steps run, from the layer noised to that step (0 keeps it, 1 starts from noise)" },
  { GIMP_PDB_STRING, "model-config", "Architecture of a .pt model that is not a released checkpoint (JSON, or a JSON file); \"\" for none" },
  { GIMP_PDB_STRING, "classifier-config", "Architecture of a .pt classifier that is not a released checkpoint; \"\" for none" },
};

static const GimpParamDef results[] = {
  { GIMP_PDB_INT32, "num-layers", "The number of new layers" },
  { GIMP_PDB_INT32ARRAY, "layer-ids", "The new layers, one per image" },
};

static void
query (void)
{
  gimp_install_procedure (GD_GIMP_PROCEDURE,
                          "Generate, vary or inpaint with classifier-guided diffusion",
                          "Samples images with a diffusion model guided toward a class by a noisy "
                          "classifier (Dhariwal & Nichol 2021) and adds each as a new layer: "
                          "generated over the canvas (or the selection bounds), a variation of the "
                          "active layer, or the selection of the active layer inpainted.  The "
                          "model's output is scaled to the layer with NoHalo, the layer read at "
                          "the model's size with LoHalo; a selection becomes the new layers' alpha.",
                          "guided-diffusion-gegl",
                          "MIT",
                          "2025",
                          "Guided _Diffusion...",
                          "RGB*, GRAY*",
                          GIMP_PLUGIN,
                          G_N_ELEMENTS (arguments), G_N_ELEMENTS (results),
                          arguments, results);
  gimp_plugin_menu_register (GD_GIMP_PROCEDURE, "<Image>/Filters/Render/Diffusion");
}

static gboolean
copy_string (gchar *field, gsize size, const gchar *value, const char *name, GError **error)
{
  if (g_strlcpy (field, value ? value : "", size) < size)
    return TRUE;
  g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is longer than %" G_GSIZE_FORMAT " bytes",
               name, size - 1);
  return FALSE;
}

static gboolean
settings_from_params (GdGimpSettings *s, gint nparams, const GimpParam *param, GError **error)
{
  if (nparams != (gint) G_N_ELEMENTS (arguments))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s takes %d arguments, not %d",
                   GD_GIMP_PROCEDURE, (int) G_N_ELEMENTS (arguments), nparams);
      return FALSE;
    }
  s->mode = param[3].data.d_int32;
  s->guidance_scale = param[7].data.d_float;
  s->steps = param[8].data.d_int32;
  s->sampler = param[9].data.d_int32;
  s->eta = param[10].data.d_float;
  s->random_seed = param[11].data.d_int32 == -1;
  s->seed = (guint32) param[11].data.d_int32;
  s->n_images = param[12].data.d_int32;
  s->strength = param[13].data.d_float;
  return copy_string (s->model, sizeof s->model, param[4].data.d_string, "model", error)
         && copy_string (s->classifier, sizeof s->classifier, param[5].data.d_string, "classifier", error)
         && copy_string (s->class_name, sizeof s->class_name, param[6].data.d_string, "class-name", error)
         && copy_string (s->model_config, sizeof s->model_config, param[14].data.d_string, "model-config", error)
         && copy_string (s->classifier_config, sizeof s->classifier_config, param[15].data.d_string,
                         "classifier-config", error);
}

/* GD_GIMP_STOP_AFTER_STEP=k: the tests' stand-in for a user who presses Cancel when the
 * progress shows step k (non-interactive runs have no Cancel button). */
static gboolean
keep_going (gpointer user, int done, int total)
{
  (void) total;
  int stop_after = GPOINTER_TO_INT (user);
  return stop_after <= 0 || done < stop_after;
}

static void
run (const gchar *name, gint nparams, const GimpParam *param, gint *nreturn_vals,
     GimpParam **return_vals)
{
  (void) name;
  static GimpParam values[3];
  GimpRunMode run_mode = param[0].data.d_int32;
  gint32 image = param[1].data.d_image;
  gint32 drawable = param[2].data.d_drawable;
  GimpPDBStatusType status = GIMP_PDB_SUCCESS;
  GArray *layers = g_array_new (FALSE, FALSE, sizeof (gint32));
  GError *error = NULL;

  gegl_init (NULL, NULL);
  GdGimpSettings *s = g_new (GdGimpSettings, 1);
  gd_gimp_settings_init (s);
  if (run_mode != GIMP_RUN_NONINTERACTIVE && gimp_get_data_size (GD_GIMP_PROCEDURE) == sizeof *s)
    gimp_get_data (GD_GIMP_PROCEDURE, s);

  if (run_mode == GIMP_RUN_INTERACTIVE)
    {
      if (gd_gimp_dialog (s, image, drawable, layers))
        gimp_displays_flush ();
      else
        status = GIMP_PDB_CANCEL;
    }
  else
    {
      gboolean ok = TRUE;
      if (run_mode == GIMP_RUN_NONINTERACTIVE)
        ok = settings_from_params (s, nparams, param, &error);
      if (!ok)
        status = GIMP_PDB_CALLING_ERROR;
      else
        {
          if (s->random_seed)
            s->seed = (guint32) g_random_int_range (0, G_MAXINT32);
          const char *stop = g_getenv ("GD_GIMP_STOP_AFTER_STEP");
          GdGimpProgress progress = { .step = keep_going,
                                      .user = GINT_TO_POINTER (stop ? atoi (stop) : 0) };
          if (!gd_gimp_run (s, image, drawable, &progress, layers, &error))
            status = g_error_matches (error, GD_ERROR, GD_ERROR_CANCELLED) ? GIMP_PDB_CANCEL
                                                                           : GIMP_PDB_EXECUTION_ERROR;
          else if (run_mode != GIMP_RUN_NONINTERACTIVE)
            gimp_displays_flush ();
        }
    }

  values[0].type = GIMP_PDB_STATUS;
  values[0].data.d_status = status;
  *nreturn_vals = 1;
  if (status == GIMP_PDB_SUCCESS)
    {
      /* GIMP reads the array after run returns: it must outlive this call */
      static gint32 *ids;
      g_free (ids);
      ids = g_memdup2 (layers->data, sizeof (gint32) * MAX (layers->len, 1));
      values[1].type = GIMP_PDB_INT32;
      values[1].data.d_int32 = (gint32) layers->len;
      values[2].type = GIMP_PDB_INT32ARRAY;
      values[2].data.d_int32array = ids;
      *nreturn_vals = 3;
    }
  else if (error && run_mode != GIMP_RUN_INTERACTIVE)
    /* in the dialog the message is shown at once; here the call ends with it.  (A
     * message among the return values, as GIMP 2.10 allows, crashes GIMP when the
     * declared return values hold an array.) */
    {
      if (status == GIMP_PDB_CANCEL)
        g_prefix_error (&error, "Stopped, nothing was added to the image: ");
      gimp_message (error->message);
    }
  *return_vals = values;
  g_clear_error (&error);
  g_array_unref (layers);
  g_free (s);
}

int
main (int argc, char *argv[])
{
  /* the OpenMP threads share the cores with GIMP: they sleep between loops */
  gd_parallel_prefer_sleeping_threads (argv);
  return gimp_main (&PLUG_IN_INFO, argc, argv);
}
