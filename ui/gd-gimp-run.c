/* One run of the plug-in.  GIMP is spoken to from the main thread only; the engine works
 * in a worker thread (loading the models, then sampling) while the main thread shows the
 * progress and asks the caller, a few times a second, whether to go on.  The image is
 * read before sampling and changed only after it succeeded, inside one undo group. */
#include "gd-gimp.h"
#include "gd-checkpoint.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-op-common.h"
#include "gd-sampler.h"
#include "gd-tensor-buffer.h"

#include <stdlib.h>
#include <string.h>

void
gd_gimp_settings_init (GdGimpSettings *s)
{
  memset (s, 0, sizeof *s);
  s->mode = GD_GIMP_GENERATE;
  s->guidance_scale = 4.0;
  s->steps = 50;
  s->sampler = GD_OP_SAMPLER_DDIM;
  s->eta = 0.0;
  s->seed = 1;
  s->random_seed = TRUE;
  s->n_images = 1;
  s->strength = 0.6;
  s->bf16 = FALSE;
}

GdModel *
gd_gimp_load_model (const char *path, const char *config, GdModelKind kind,
                    gboolean shapes_only, GError **error)
{
  char *file = *path ? g_strdup (path) : gd_default_model_path (kind, error);
  if (!file)
    return NULL;
  char *json = *config ? gd_checkpoint_read_config (config, error) : NULL;
  GdModel *model = NULL;
  if (json || !*config)
    {
      GdLoadOptions options = { .config = json, .shapes_only = shapes_only };
      model = gd_checkpoint_load (file, &options, error);
    }
  if (model && gd_model_get_config (model)->kind != kind)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   kind == GD_MODEL_UNET ? "%s is a classifier, not a diffusion model"
                                         : "%s is a diffusion model, not a classifier",
                   file);
      g_clear_pointer (&model, gd_model_free);
    }
  g_free (json);
  g_free (file);
  return model;
}

GPtrArray *
gd_gimp_labels (GdModel *classifier, GdModel *model, const char **origin)
{
  GdModel *sources[2] = { classifier, model };
  for (int i = 0; i < 2; i++)
    if (sources[i])
      {
        GPtrArray *labels = gd_model_labels (sources[i], NULL);
        if (labels)
          {
            if (origin)
              *origin = gd_model_get_origin (sources[i]);
            return labels;
          }
      }
  return NULL;
}

gboolean
gd_gimp_resolve_class (GdModel *classifier, GdModel *model, const char *name, int64_t *chosen,
                       GError **error)
{
  char *text = g_strstrip (g_strdup (name));
  GPtrArray *labels = gd_gimp_labels (classifier, model, NULL);
  gboolean ok;
  char *end = NULL;
  long number = *text ? strtol (text, &end, 10) : -1;
  if (!labels && *text && (*end || number < 0))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "class '%s': %s has no list of class names; give the class number", text,
                   gd_model_get_origin (classifier ? classifier : model));
      ok = FALSE;
    }
  else if (!labels && *text)
    ok = gd_op_class (classifier, model, (int) MIN (number, G_MAXINT), NULL, chosen, error);
  else
    ok = gd_op_class (classifier, model, -1, text, chosen, error);
  if (labels)
    g_ptr_array_unref (labels);
  g_free (text);
  return ok;
}

/* ---- where the layers go ---- */

typedef struct {
  GeglRectangle region;   /* the new layers, in image coordinates */
  GeglRectangle source;   /* the same area in the coordinates of the drawable (vary, inpaint) */
  gint32 drawable;        /* the layer varied or inpainted, or -1 */
  gboolean masked;        /* a selection limits the layers: it becomes their alpha */
  gboolean gray;          /* a grayscale image */
} Target;

static gboolean
find_target (const GdGimpSettings *s, gint32 image, gint32 drawable, Target *t, GError **error)
{
  *t = (Target) { .drawable = -1 };
  GimpImageBaseType base = gimp_image_base_type (image);
  if (base == GIMP_INDEXED)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "Guided Diffusion works on RGB and grayscale images: convert this indexed image first (Image > Mode)");
      return FALSE;
    }
  t->gray = base == GIMP_GRAY;
  t->masked = !gimp_selection_is_empty (image);
  if (s->mode == GD_GIMP_GENERATE)
    {
      t->region = (GeglRectangle) { 0, 0, gimp_image_width (image), gimp_image_height (image) };
      gboolean any;
      gint x1, y1, x2, y2;
      if (t->masked && gimp_selection_bounds (image, &any, &x1, &y1, &x2, &y2) && any)
        t->region = (GeglRectangle) { x1, y1, x2 - x1, y2 - y1 };
      return TRUE;
    }
  const char *what = s->mode == GD_GIMP_VARY ? "vary" : "inpaint";
  if (s->mode == GD_GIMP_INPAINT && !t->masked)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "Inpainting regenerates the selection: select the part of the layer to replace first");
      return FALSE;
    }
  if (drawable > 0 && gimp_item_is_layer_mask (drawable))
    drawable = gimp_layer_from_mask (drawable);
  if (drawable <= 0 || !gimp_item_is_valid (drawable) || !gimp_item_is_layer (drawable)
      || gimp_item_is_group (drawable))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "nothing to %s: make a layer with pixels (not a group or a channel) the active layer",
                   what);
      return FALSE;
    }
  gint x, y, w, h, ox, oy;
  if (!gimp_drawable_mask_intersect (drawable, &x, &y, &w, &h) || w < 1 || h < 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "nothing to %s: the selection does not overlap the layer '%s'", what,
                   gimp_item_get_name (drawable));
      return FALSE;
    }
  gimp_drawable_offsets (drawable, &ox, &oy);
  t->drawable = drawable;
  t->source = (GeglRectangle) { x, y, w, h };
  t->region = (GeglRectangle) { x + ox, y + oy, w, h };
  return TRUE;
}

/* ---- resampling between the image and the model's size ---- */

/* `rect` of a buffer, moved to the origin: the start of the graphs below. */
static GeglNode *
region_source (GeglNode *graph, GeglBuffer *buffer, const GeglRectangle *rect)
{
  GeglNode *source = gegl_node_new_child (graph, "operation", "gegl:buffer-source",
                                          "buffer", buffer, NULL);
  GeglNode *crop = gegl_node_new_child (graph, "operation", "gegl:crop",
                                        "x", (gdouble) rect->x, "y", (gdouble) rect->y,
                                        "width", (gdouble) rect->width,
                                        "height", (gdouble) rect->height, NULL);
  GeglNode *move = gegl_node_new_child (graph, "operation", "gegl:translate",
                                        "x", (gdouble) -rect->x, "y", (gdouble) -rect->y, NULL);
  gegl_node_link_many (source, crop, move, NULL);
  return move;
}

/* input scaled to width x height, edges clamped (no dark rim from the abyss). */
static GeglNode *
scaled (GeglNode *graph, GeglNode *input, int width, int height, GeglSamplerType sampler)
{
  GeglNode *scale = gegl_node_new_child (graph, "operation", "gegl:scale-size",
                                         "x", (gdouble) width, "y", (gdouble) height,
                                         "sampler", sampler,
                                         "abyss-policy", GEGL_ABYSS_CLAMP, NULL);
  GeglNode *crop = gegl_node_new_child (graph, "operation", "gegl:crop", "x", 0.0, "y", 0.0,
                                        "width", (gdouble) width, "height", (gdouble) height,
                                        NULL);
  gegl_node_link_many (input, scale, crop, NULL);
  return crop;
}

/* `rect` of a buffer at size x size as a tensor: image pixels in model space ([channels,
 * size, size]) or, for a mask, one linear value per pixel.  Downscaling is LoHalo's. */
static float *
read_tensor (GeglBuffer *buffer, const GeglRectangle *rect, int size, int channels,
             gboolean mask)
{
  GeglRectangle square = { 0, 0, size, size };
  GeglBuffer *small = NULL;
  if (rect->width != size || rect->height != size)
    {
      GeglNode *graph = gegl_node_new ();
      GeglNode *out = scaled (graph, region_source (graph, buffer, rect), size, size,
                              GEGL_SAMPLER_LOHALO);
      small = gegl_buffer_new (&square, mask ? babl_format ("Y float") : gd_image_format (channels));
      gegl_node_blit_buffer (out, small, &square, 0, GEGL_ABYSS_NONE);
      g_object_unref (graph);
      buffer = small;
      rect = &square;
    }
  float *tensor = mask ? gd_mask_from_buffer (buffer, rect) : gd_tensor_from_image (buffer, rect, channels);
  g_clear_object (&small);
  return tensor;
}

/* One image [channels, size, size] of model space written into a new layer: upscaled
 * with NoHalo to the region when the sizes differ, the selection as its alpha. */
static void
write_layer (gint32 layer, const float *x, int size, int channels, const Target *t,
             gint32 image)
{
  GeglRectangle square = { 0, 0, size, size };
  GeglBuffer *result = gegl_buffer_new (&square, gd_image_format (channels));
  gd_tensor_to_image (result, &square, x, channels);
  GeglBuffer *target = gimp_drawable_get_buffer (layer);
  GeglBuffer *selection = t->masked ? gimp_drawable_get_buffer (gimp_image_get_selection (image)) : NULL;
  GeglNode *graph = gegl_node_new ();
  GeglNode *last = gegl_node_new_child (graph, "operation", "gegl:buffer-source",
                                        "buffer", result, NULL);
  if (t->region.width != size || t->region.height != size)
    last = scaled (graph, last, t->region.width, t->region.height, GEGL_SAMPLER_NOHALO);
  if (selection)
    {
      GeglNode *opacity = gegl_node_new_child (graph, "operation", "gegl:opacity", NULL);
      gegl_node_link (last, opacity);
      gegl_node_connect_to (region_source (graph, selection, &t->region), "output", opacity, "aux");
      last = opacity;
    }
  GeglNode *write = gegl_node_new_child (graph, "operation", "gegl:write-buffer",
                                         "buffer", target, NULL);
  gegl_node_link (last, write);
  gegl_node_process (write);
  g_object_unref (graph);
  g_clear_object (&selection);
  g_object_unref (target);
  g_object_unref (result);
  gimp_drawable_update (layer, 0, 0, t->region.width, t->region.height);
}

/* ---- the engine's part, in a worker thread ---- */

typedef struct Job Job;
typedef gboolean (*JobFunc) (Job *job, GError **error);

struct Job {
  const GdGimpSettings *s;
  GdModel *model, *classifier;
  GdDiffusion *diffusion;
  int64_t *labels;            /* [n], or NULL: no class */
  int64_t chosen;             /* the class asked for, -1: drawn per image */
  int size, channels;
  float *init_image, *mask;   /* [n, ...] */
  float *x;                   /* [n, channels, size, size] */
  /* between the threads */
  GMutex lock;
  GCond changed;
  int done, total;
  gboolean finished;
  gint stop;                  /* atomic */
  JobFunc func;
  gboolean ok;
  GError *error;
};

static gboolean
load (Job *job, GError **error)
{
  const GdGimpSettings *s = job->s;
  job->model = gd_gimp_load_model (s->model, s->model_config, GD_MODEL_UNET, FALSE, error);
  if (!job->model)
    return FALSE;
  /* a classifier named is always used; the default one only when guiding */
  if (*s->classifier || s->guidance_scale != 0.0)
    {
      job->classifier = gd_gimp_load_model (s->classifier, s->classifier_config,
                                            GD_MODEL_CLASSIFIER, FALSE, error);
      if (!job->classifier)
        return FALSE;
    }
  if (s->bf16 && (!gd_model_set_bf16 (job->model, TRUE, error)
                  || (job->classifier && !gd_model_set_bf16 (job->classifier, TRUE, error))))
    return FALSE;
  const GdModelConfig *mc = gd_model_get_config (job->model);
  job->size = mc->image_size;
  job->channels = mc->in_channels;
  if (!gd_gimp_resolve_class (job->classifier, job->model, s->class_name, &job->chosen, error))
    return FALSE;
  job->diffusion = gd_op_diffusion (job->model, s->steps, NULL, (GdOpSampler) s->sampler, error);
  if (!job->diffusion)
    return FALSE;
  if (mc->num_classes > 0 || job->classifier)
    {
      int count = job->classifier ? gd_model_get_config (job->classifier)->out_channels
                                  : mc->num_classes;
      job->labels = g_new (int64_t, s->n_images);
      for (int j = 0; j < s->n_images; j++)
        job->labels[j] = job->chosen >= 0 ? job->chosen : gd_sample_draw_class (s->seed, j, count);
    }
  GdSampleOptions o = {
    .model = job->model, .classifier = job->classifier, .diffusion = job->diffusion,
    .labels = job->labels, .settings = { .guidance_scale = s->guidance_scale },
  };
  return gd_sample_check (&o, s->n_images, job->size, job->size, error);
}

static gboolean
step_done (void *user, int done, int total)
{
  Job *job = user;
  g_mutex_lock (&job->lock);
  job->done = done;
  job->total = total;
  g_cond_signal (&job->changed);
  g_mutex_unlock (&job->lock);
  return !g_atomic_int_get (&job->stop);
}

static gboolean
sample (Job *job, GError **error)
{
  const GdGimpSettings *s = job->s;
  GdSampleOptions o = {
    .model = job->model,
    .classifier = job->classifier,
    .diffusion = job->diffusion,
    .settings = {
      .sampler = gd_op_sampler_kind ((GdOpSampler) s->sampler),
      .eta = s->eta,
      .guidance_scale = s->guidance_scale,
      .clip_denoised = TRUE,
    },
    .labels = job->labels,
    .seed = s->seed,
    .user = job,
    .progress_fn = step_done,
    .init_image = job->init_image,
    .strength = job->init_image ? s->strength : 0.0,
    .mask = job->mask,
  };
  size_t per_image = (size_t) job->channels * job->size * job->size;
  job->x = g_new (float, per_image * s->n_images);
  gd_sample_initial_noise (s->seed, s->n_images, per_image, job->x);
  return gd_sample_run (&o, job->x, s->n_images, job->size, job->size, error);
}

static gpointer
work (gpointer data)
{
  Job *job = data;
  gboolean ok = job->func (job, &job->error);
  /* a stop asked for while the last step or the loading ran still counts */
  if (ok && g_atomic_int_get (&job->stop))
    {
      g_set_error (&job->error, GD_ERROR, GD_ERROR_CANCELLED, "stopped before any layer was added");
      ok = FALSE;
    }
  g_mutex_lock (&job->lock);
  job->ok = ok;
  job->finished = TRUE;
  g_cond_signal (&job->changed);
  g_mutex_unlock (&job->lock);
  return NULL;
}

/* Runs func in a worker thread; meanwhile shows its steps in GIMP's progress bar and
 * asks progress->step (every 100 ms and at each new step) whether to go on. */
static gboolean
run_job (Job *job, JobFunc func, const char *activity, const GdGimpProgress *progress,
         GError **error)
{
  job->func = func;
  job->finished = FALSE;
  job->done = job->total = 0;
  gimp_progress_set_text_printf ("Guided Diffusion: %s", activity);
  gimp_progress_pulse ();
  GThread *thread = g_thread_new ("guided-diffusion", work, job);
  int shown = 0;
  for (;;)
    {
      g_mutex_lock (&job->lock);
      if (!job->finished && job->done == shown)
        g_cond_wait_until (&job->changed, &job->lock,
                           g_get_monotonic_time () + 100 * G_TIME_SPAN_MILLISECOND);
      int done = job->done, total = job->total;
      gboolean finished = job->finished;
      g_mutex_unlock (&job->lock);
      if (total > 0 && done != shown)
        {
          gimp_progress_set_text_printf ("Guided Diffusion: step %d of %d", done, total);
          gimp_progress_update ((gdouble) done / total);
          shown = done;
        }
      if (finished)
        break;
      if (progress && progress->step && !progress->step (progress->user, done, total))
        g_atomic_int_set (&job->stop, 1);
    }
  g_thread_join (thread);
  if (!job->ok)
    {
      g_propagate_error (error, job->error);
      job->error = NULL;
    }
  return job->ok;
}

static void
job_clear (Job *job)
{
  gd_model_free (job->model);
  gd_model_free (job->classifier);
  gd_diffusion_free (job->diffusion);
  g_free (job->labels);
  g_free (job->init_image);
  g_free (job->mask);
  g_free (job->x);
  g_mutex_clear (&job->lock);
  g_cond_clear (&job->changed);
  g_clear_error (&job->error);
}

/* ---- the run ---- */

static gboolean
check_settings (const GdGimpSettings *s, GError **error)
{
  const char *problem = NULL;
  if (s->mode < 0 || s->mode >= GD_GIMP_N_MODES)
    problem = "mode must be 0 (generate), 1 (vary) or 2 (inpaint)";
  else if (s->sampler != GD_OP_SAMPLER_DDIM && s->sampler != GD_OP_SAMPLER_DDPM)
    problem = "sampler must be 0 (DDIM) or 1 (DDPM)";
  else if (s->steps < 1 || s->steps > 10000)
    problem = "steps must be 1 to 10000";
  else if (s->n_images < 1 || s->n_images > 64)
    problem = "the number of images must be 1 to 64";
  else if (!(s->eta >= 0.0))
    problem = "eta must not be negative";
  else if (!(s->strength >= 0.0 && s->strength <= 1.0))
    problem = "strength must be in [0, 1]";
  else if (!(s->guidance_scale >= -1000.0 && s->guidance_scale <= 1000.0))
    problem = "the guidance scale must be in [-1000, 1000]";
  if (problem)
    g_set_error_literal (error, GD_ERROR, GD_ERROR_INPUT, problem);
  return problem == NULL;
}

/* "Trouser", "class 3" or "no class": what image j was guided toward. */
static char *
class_text (Job *job, GPtrArray *names, int j)
{
  if (!job->labels)
    return g_strdup ("no class");
  int64_t c = job->labels[j];
  if (names && c < names->len)
    return g_strdup (names->pdata[c]);
  return g_strdup_printf ("class %" G_GINT64_FORMAT, c);
}

static void
add_layers (Job *job, gint32 image, const Target *t, GArray *layers)
{
  const GdGimpSettings *s = job->s;
  static const char *const titles[] = { "Guided Diffusion", "Guided Diffusion variation",
                                        "Guided Diffusion inpainting" };
  GimpImageType type = t->gray ? (t->masked ? GIMP_GRAYA_IMAGE : GIMP_GRAY_IMAGE)
                               : (t->masked ? GIMP_RGBA_IMAGE : GIMP_RGB_IMAGE);
  gint32 parent = 0;
  gint position = -1;   /* above the active layer */
  if (t->drawable > 0)
    {
      parent = MAX (gimp_item_get_parent (t->drawable), 0);
      position = gimp_image_get_item_position (image, t->drawable);
    }
  GPtrArray *names = gd_gimp_labels (job->classifier, job->model, NULL);
  size_t per_image = (size_t) job->channels * job->size * job->size;
  gimp_image_undo_group_start (image);
  for (int j = 0; j < s->n_images; j++)
    {
      char *what = class_text (job, names, j);
      char *name = g_strdup_printf ("%s: %s, seed %u", titles[s->mode], what, s->seed + (guint32) j);
      gint32 layer = gimp_layer_new (image, name, t->region.width, t->region.height, type,
                                     100.0, GIMP_LAYER_MODE_NORMAL);
      gimp_image_insert_layer (image, layer, parent, position);
      gimp_layer_set_offsets (layer, t->region.x, t->region.y);
      write_layer (layer, job->x + j * per_image, job->size, job->channels, t, image);
      g_array_append_val (layers, layer);
      g_free (name);
      g_free (what);
    }
  gimp_image_undo_group_end (image);
  if (names)
    g_ptr_array_unref (names);
}

/* The inputs of vary and inpaint: the layer (and the selection) at the model's size,
 * one copy per image. */
static void
read_inputs (Job *job, gint32 image, const Target *t)
{
  int n = job->s->n_images;
  size_t per_image = (size_t) job->channels * job->size * job->size;
  size_t per_mask = (size_t) job->size * job->size;
  GeglBuffer *pixels = gimp_drawable_get_buffer (t->drawable);
  float *one = read_tensor (pixels, &t->source, job->size, job->channels, FALSE);
  g_object_unref (pixels);
  job->init_image = g_new (float, per_image * n);
  for (int j = 0; j < n; j++)
    memcpy (job->init_image + j * per_image, one, sizeof (float) * per_image);
  g_free (one);
  if (job->s->mode != GD_GIMP_INPAINT)
    return;
  GeglBuffer *selection = gimp_drawable_get_buffer (gimp_image_get_selection (image));
  float *mask = read_tensor (selection, &t->region, job->size, 1, TRUE);
  g_object_unref (selection);
  job->mask = g_new (float, per_mask * n);
  for (int j = 0; j < n; j++)
    memcpy (job->mask + j * per_mask, mask, sizeof (float) * per_mask);
  g_free (mask);
}

gboolean
gd_gimp_run (const GdGimpSettings *s, gint32 image, gint32 drawable,
             const GdGimpProgress *progress, GArray *layers, GError **error)
{
  Target t;
  if (!check_settings (s, error) || !find_target (s, image, drawable, &t, error))
    return FALSE;
  Job job = { .s = s, .chosen = -1 };
  g_mutex_init (&job.lock);
  g_cond_init (&job.changed);
  gimp_progress_init ("Guided Diffusion");
  gboolean ok = run_job (&job, load, "loading the models", progress, error);
  if (ok && t.drawable > 0)
    read_inputs (&job, image, &t);
  if (ok)
    ok = run_job (&job, sample, "sampling", progress, error);
  if (ok)
    {
      gimp_progress_set_text ("Guided Diffusion: adding the layers");
      add_layers (&job, image, &t, layers);
    }
  gimp_progress_end ();
  job_clear (&job);
  return ok;
}
