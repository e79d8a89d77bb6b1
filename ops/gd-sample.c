/* gd:sample — classifier-guided sampling in one node (Dhariwal & Nichol 2021, Algorithms
 * 1 and 2): x_T from the seed, every respaced step with the model and the classifier
 * gradient, decoded to an image.  The same settings give the pixels `guided sample`
 * writes.  With an input image it varies that image (SDEdit, Meng et al. 2022: start
 * from it noised to step strength * steps); with a mask on aux it inpaints (white is
 * regenerated; elsewhere the image, noised to the current step, replaces the sample). */
#include "gd-config-description.h"

#ifdef GEGL_PROPERTIES

property_file_path (model, "Model", "")
  description ("Diffusion model file (.safetensors or .pt); empty: the default model of the data dir")
property_string (model_config, "Model config", "")
  description (GD_CONFIG_DESCRIPTION)
property_file_path (classifier, "Classifier", "")
  description ("Noisy classifier that guides; empty: the default classifier of the data dir (loaded only when guidance scale is not 0)")
property_string (classifier_config, "Classifier config", "")
  description (GD_CONFIG_DESCRIPTION)
property_int (class, "Class", -1)
  description ("Class to guide toward (and of a class-conditional model); -1 draws one from the seed")
  value_range (-1, 100000)
  ui_range (-1, 1000)
property_string (label, "Label", "")
  description ("Class by name from the classifier's (else the model's) label list")
property_double (guidance_scale, "Guidance scale", 1.0)
  description ("Scale s of the classifier gradient; 0 samples without guidance")
  value_range (-1000.0, 1000.0)
  ui_range (0.0, 30.0)
#include "gd-schedule-properties.h"
property_double (eta, "Eta", 0.0)
  description ("DDIM noise: 0 is deterministic")
  value_range (0.0, 10.0)
  ui_range (0.0, 1.0)
property_seed (seed, "Seed", rand)
  description ("Random seed: x_T, the noise of stochastic steps and a drawn class")
property_boolean (clip_denoised, "Clip denoised", TRUE)
  description ("Clamp the predicted x_0 to [-1, 1]")
property_boolean (bf16, "bf16", FALSE)
  description ("Run the models' convolutions in bfloat16 with float sums (processors with AMX-BF16 or AVX512-BF16): faster, slightly less exact")
property_double (strength, "Strength", 1.0)
  description ("With an input image: the fraction of the steps run from the image noised to that step (0 keeps the image, 1 starts from almost pure noise)")
  value_range (0.0, 1.0)

#else

#define GEGL_OP_COMPOSER
#define GEGL_OP_NAME gd_sample
#define GEGL_OP_C_SOURCE gd-sample.c

#include "gd-op-common.h"
#include "gegl-op.h"
#include "gd-error.h"
#include "gd-sampler.h"
#include "gd-tensor-buffer.h"

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  p->model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, error);
  if (!p->model)
    return FALSE;
  /* a classifier named is always used (as `guided sample --classifier` does); the default
   * one only when guiding */
  if (*o->classifier || o->guidance_scale != 0.0)
    {
      p->classifier = gd_op_get_model (operation, "gd-classifier", o->classifier, o->classifier_config,
                                       GD_MODEL_CLASSIFIER, error);
      if (!p->classifier)
        return FALSE;
    }
  else
    gd_op_drop_model (operation, "gd-classifier");
  GdModel *model = p->model->model, *classifier = p->classifier ? p->classifier->model : NULL;
  const GdModelConfig *cfg = gd_model_get_config (model);
  if (!gd_op_class (classifier, model, o->class, o->label, &p->label, error))
    return FALSE;
  int class_count = classifier ? gd_model_get_config (classifier)->out_channels : cfg->num_classes;
  if (p->label < 0 && (cfg->num_classes > 0 || classifier))
    p->label = gd_sample_draw_class (o->seed, 0, class_count);
  p->diffusion = gd_op_diffusion (model, o->steps, o->respacing, o->sampler, error);
  if (!p->diffusion)
    return FALSE;

  p->box = (GeglRectangle) { 0, 0, cfg->image_size, cfg->image_size };
  p->has_image = gegl_operation_get_source_node (operation, "input") != NULL;
  p->has_mask = gegl_operation_get_source_node (operation, "aux") != NULL;
  if (p->has_image && !gd_op_source_box (operation, "input", &p->box, quiet, error))
    return FALSE;
  if (p->has_mask)
    {
      GeglRectangle mask;
      if (!p->has_image)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "a mask on aux needs the image to inpaint on the input pad");
          return FALSE;
        }
      if (!gd_op_source_box (operation, "aux", &mask, quiet, error))
        return FALSE;
      if (!gegl_rectangle_contains (&mask, &p->box))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "the mask (%dx%d at %d, %d) does not cover the image (%dx%d at %d, %d)",
                       mask.width, mask.height, mask.x, mask.y, p->box.width, p->box.height,
                       p->box.x, p->box.y);
          return FALSE;
        }
    }
  GdSampleOptions options = {
    .model = model,
    .classifier = classifier,
    .diffusion = p->diffusion,
    .labels = p->label >= 0 ? &p->label : NULL,
    .settings = { .guidance_scale = o->guidance_scale },
  };
  return gd_sample_check (&options, 1, p->box.height, p->box.width, error);
}

static void
prepare (GeglOperation *operation)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdCachedModel *model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, NULL);
  int channels = model ? gd_model_get_config (model->model)->in_channels : 3;
  gegl_operation_set_format (operation, "input", gd_image_format (channels));
  gegl_operation_set_format (operation, "aux", babl_format ("Y float"));
  gegl_operation_set_format (operation, "output", gd_image_format (channels));
}

static gboolean
report_progress (void *user, int done, int total)
{
  char message[64];
  g_snprintf (message, sizeof message, "gd:sample step %d of %d", done, total);
  gd_op_progress (user, (double) done / total, message);
  return TRUE;
}

static gboolean
process (GeglOperation *operation, GeglBuffer *input, GeglBuffer *aux, GeglBuffer *output,
         const GeglRectangle *result, gint level)
{
  (void) result;
  (void) level;
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdOpPlan p;
  GError *error = NULL;
  if (gd_op_plan_begin (operation, plan, &p, &error) && (input || !p.has_image)
      && (aux || !p.has_mask))
    {
      GdModel *model = p.model->model;
      int channels = gd_model_get_config (model)->in_channels;
      size_t per_image = (size_t) channels * p.box.width * p.box.height;
      float *x = g_new (float, per_image);
      float *image = p.has_image ? gd_tensor_from_image (input, &p.box, channels) : NULL;
      float *mask = p.has_mask ? gd_mask_from_buffer (aux, &p.box) : NULL;
      GdSampleOptions options = {
        .model = model,
        .classifier = p.classifier ? p.classifier->model : NULL,
        .diffusion = p.diffusion,
        .settings = {
          .sampler = gd_op_sampler_kind (o->sampler),
          .eta = o->eta,
          .guidance_scale = o->guidance_scale,
          .clip_denoised = o->clip_denoised,
        },
        .labels = p.label >= 0 ? &p.label : NULL,
        .seed = o->seed,
        .user = operation,
        .progress_fn = report_progress,
        .init_image = image,
        .strength = o->strength,
        .mask = mask,
      };
      gd_sample_initial_noise (o->seed, 1, per_image, x);
      gd_op_progress (operation, 0.0, "gd:sample");
      /* model before classifier, the one order every node locks in */
      g_mutex_lock (&p.model->lock);
      if (p.classifier)
        g_mutex_lock (&p.classifier->lock);
      gboolean ok = gd_model_set_bf16 (p.model->model, o->bf16, &error)
                    && (!p.classifier || gd_model_set_bf16 (p.classifier->model, o->bf16, &error))
                    && gd_sample_run (&options, x, 1, p.box.height, p.box.width, &error);
      if (p.classifier)
        g_mutex_unlock (&p.classifier->lock);
      g_mutex_unlock (&p.model->lock);
      if (ok)
        gd_tensor_to_image (output, &p.box, x, channels);
      g_free (x);
      g_free (image);
      g_free (mask);
    }
  gd_op_plan_end (operation, &p, error);
  return TRUE;
}

/* Runs with or without buffers on input and aux: with neither, the node is a source
 * (the composer base class would refuse that). */
static gboolean
operation_process (GeglOperation *operation, GeglOperationContext *context,
                   const gchar *output_pad, const GeglRectangle *result, gint level)
{
  (void) output_pad;
  GeglBuffer *input = (GeglBuffer *) gegl_operation_context_dup_object (context, "input");
  GeglBuffer *aux = (GeglBuffer *) gegl_operation_context_dup_object (context, "aux");
  GeglBuffer *output = gegl_operation_context_get_target (context, "output");
  gboolean ok = process (operation, input, aux, output, result, level);
  g_clear_object (&input);
  g_clear_object (&aux);
  return ok;
}

static void
gegl_op_class_init (GeglOpClass *klass)
{
  GeglOperationClass *operation_class = GEGL_OPERATION_CLASS (klass);
  GeglOperationComposerClass *composer_class = GEGL_OPERATION_COMPOSER_CLASS (klass);

  composer_class->process = process;
  composer_class->aux_label = "Mask";
  composer_class->aux_description = "Inpainting mask: white is regenerated, black keeps the input image";
  operation_class->process = operation_process;
  gd_op_class_setup (operation_class, prepare, plan, TRUE);

  gegl_operation_class_set_keys (operation_class,
    "name", "gd:sample",
    "title", "Guided Diffusion",
    "categories", "render",
    "gimp:menu-path", "<Image>/Filters/Render/Diffusion",
    "gimp:menu-label", "Guided Diffusion...",
    "description",
      "Generates an image with a diffusion model guided toward a class by a noisy classifier "
      "(Dhariwal & Nichol 2021).  Optionally varies the input image (strength) or inpaints "
      "the white part of a mask on aux.",
    NULL);
}

#endif
