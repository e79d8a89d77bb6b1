#include "gd-op-common.h"
#include "gd-error.h"
#include "gd-metadata.h"

#include <string.h>

#ifndef GD_DATADIR
#error "GD_DATADIR (the installed data dir) must be defined by the build"
#endif

GType
gd_op_sampler_get_type (void)
{
  static GType type = 0;
  if (g_once_init_enter (&type))
    {
      static const GEnumValue values[] = {
        { GD_OP_SAMPLER_DDIM, "DDIM (Algorithm 2)", "ddim" },
        { GD_OP_SAMPLER_DDPM, "DDPM (Algorithm 1)", "ddpm" },
        { 0, NULL, NULL },
      };
      g_once_init_leave (&type, g_enum_register_static ("GdOpSampler", values));
    }
  return type;
}

GdSamplerKind
gd_op_sampler_kind (GdOpSampler sampler)
{
  return sampler == GD_OP_SAMPLER_DDPM ? GD_SAMPLER_DDPM : GD_SAMPLER_DDIM;
}

char *
gd_default_model_path (GdModelKind kind, GError **error)
{
  const char *file = kind == GD_MODEL_UNET ? "default-unet.safetensors"
                                           : "default-classifier.safetensors";
  GPtrArray *dirs = g_ptr_array_new_with_free_func (g_free);
  const char *env = g_getenv ("GD_DATA_DIR");
  if (env && *env)
    g_ptr_array_add (dirs, g_strdup (env));
  else
    {
      g_ptr_array_add (dirs, g_strdup (GD_DATADIR));
      g_ptr_array_add (dirs, g_build_filename (g_get_user_data_dir (), "guided-diffusion", NULL));
    }
  GString *tried = g_string_new (NULL);
  char *found = NULL;
  for (guint i = 0; i < dirs->len && !found; i++)
    {
      char *path = g_build_filename (dirs->pdata[i], "models", file, NULL);
      if (g_file_test (path, G_FILE_TEST_IS_REGULAR))
        found = path;
      else
        {
          g_string_append_printf (tried, "%s%s", tried->len ? ", " : "", path);
          g_free (path);
        }
    }
  if (!found)
    g_set_error (error, GD_ERROR, GD_ERROR_IO,
                 "no default %s: %s %s missing (name a model file in the property, or install the default models)",
                 kind == GD_MODEL_UNET ? "diffusion model" : "classifier", tried->str,
                 dirs->len > 1 ? "are" : "is");
  g_string_free (tried, TRUE);
  g_ptr_array_unref (dirs);
  return found;
}

GdCachedModel *
gd_op_get_model (GeglOperation *op, const char *slot, const char *path, const char *config,
                 GdModelKind kind, GError **error)
{
  if (!config)
    config = "";
  char *file = path && *path ? g_strdup (path) : gd_default_model_path (kind, error);
  if (!file)
    {
      gd_op_drop_model (op, slot);
      return NULL;
    }
  char *key = g_canonicalize_filename (file, NULL);
  GdCachedModel *held = g_object_get_data (G_OBJECT (op), slot);
  GdCachedModel *entry = held;
  if (!held || strcmp (held->path, key) != 0 || strcmp (held->config, config) != 0)
    {
      entry = gd_model_cache_acquire (file, config, error);
      /* the new one is taken before the old one goes, so a file named again stays loaded */
      g_object_set_data_full (G_OBJECT (op), slot, entry,
                              (GDestroyNotify) gd_model_cache_release);
    }
  g_free (key);
  g_free (file);
  if (entry && gd_model_get_config (entry->model)->kind != kind)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   kind == GD_MODEL_UNET ? "%s is a classifier, not a diffusion model"
                                         : "%s is a diffusion model, not a classifier",
                   gd_model_get_origin (entry->model));
      return NULL;
    }
  return entry;
}

void
gd_op_drop_model (GeglOperation *op, const char *slot)
{
  g_object_set_data (G_OBJECT (op), slot, NULL);
}

char *
gd_op_respacing (int steps, const char *respacing, GdOpSampler sampler)
{
  if (respacing && *respacing)
    return g_strdup (respacing);
  return g_strdup_printf ("%s%d", sampler == GD_OP_SAMPLER_DDIM ? "ddim" : "", steps);
}

GdDiffusion *
gd_op_diffusion (const GdModel *model, int steps, const char *respacing, GdOpSampler sampler,
                 GError **error)
{
  GdDiffusionSettings settings;
  if (!gd_model_diffusion_settings (model, &settings, error))
    return NULL;
  if (steps < 1 && !(respacing && *respacing))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "steps %d: at least one step is needed", steps);
      return NULL;
    }
  char *spec = gd_op_respacing (steps, respacing, sampler);
  GdDiffusion *d = gd_diffusion_new (settings.schedule, settings.steps, spec, settings.variance,
                                     error);
  if (!d)
    g_prefix_error (error, "respacing '%s' of %s: ", spec, gd_model_get_origin (model));
  g_free (spec);
  return d;
}

gboolean
gd_op_check_step (int step, const GdDiffusion *d, GError **error)
{
  if (step >= 0 && step < d->num_steps)
    return TRUE;
  g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
               "step %d is out of range: the respaced process has %d steps (0 to %d)", step,
               d->num_steps, d->num_steps - 1);
  return FALSE;
}

gboolean
gd_op_class (GdModel *classifier, GdModel *model, int class_index, const char *label,
             int64_t *chosen, GError **error)
{
  *chosen = class_index < 0 ? -1 : class_index;
  if (label && *label)
    {
      GdModel *sources[2] = { classifier, model };
      for (int i = 0; i < 2; i++)
        if (sources[i])
          {
            GPtrArray *labels = gd_model_labels (sources[i], error);
            if (!labels && error && *error)
              return FALSE;
            if (!labels)
              continue;
            int found = gd_labels_lookup (labels, label, gd_model_get_origin (sources[i]), error);
            g_ptr_array_unref (labels);
            if (found < 0)
              return FALSE;
            *chosen = found;
            break;
          }
      if (*chosen < 0)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "label '%s': %s has no label list; give the class index instead", label,
                       gd_model_get_origin (classifier ? classifier : model));
          return FALSE;
        }
    }
  if (*chosen < 0)
    return TRUE;
  GdModel *sources[2] = { classifier, model };
  for (int i = 0; i < 2; i++)
    {
      if (!sources[i])
        continue;
      const GdModelConfig *cfg = gd_model_get_config (sources[i]);
      int count = cfg->kind == GD_MODEL_CLASSIFIER ? cfg->out_channels : cfg->num_classes;
      if (cfg->kind == GD_MODEL_UNET && count == 0)
        continue;
      if (*chosen >= count)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "class %" G_GINT64_FORMAT " is out of range: %s has %d classes (0 to %d)",
                       *chosen, gd_model_get_origin (sources[i]), count, count - 1);
          return FALSE;
        }
    }
  return TRUE;
}

gboolean
gd_op_source_box (GeglOperation *op, const char *pad, GeglRectangle *box, gboolean *empty,
                  GError **error)
{
  *empty = FALSE;
  if (!gegl_operation_get_source_node (op, pad))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "nothing is connected to the %s pad", pad);
      return FALSE;
    }
  GeglRectangle *source = gegl_operation_source_get_bounding_box (op, pad);
  if (!source || source->width <= 0 || source->height <= 0)
    {
      *empty = TRUE;
      return FALSE;
    }
  *box = *source;
  return TRUE;
}

int
gd_op_source_channels (GeglOperation *op, const char *pad)
{
  const Babl *format = gegl_operation_get_source_format (op, pad);
  if (!format)
    return 0;
  if (babl_format_is_format_n (format))
    return babl_format_get_n_components (format);
  return babl_get_name (babl_format_get_model (format))[0] == 'Y' ? 1 : 3;
}

gboolean
gd_op_check_channels (GeglOperation *op, const char *pad, const char *what, int expected,
                      const GdModel *model, GError **error)
{
  int channels = gd_op_source_channels (op, pad);
  if (channels == 0 || channels == expected)
    return TRUE;
  g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s has %d channel%s but %s needs %d", what,
               channels, channels == 1 ? "" : "s", gd_model_get_origin (model), expected);
  return FALSE;
}

gboolean
gd_op_check_size (const GdModel *model, int channels, const GeglRectangle *box,
                  const int64_t *labels, GError **error)
{
  return gd_model_check_input (model, 1, channels, box->height, box->width, labels, error);
}

void
gd_op_warn (GeglOperation *op, const GError *error)
{
  if (g_object_get_data (G_OBJECT (op), "gd-in-notify"))
    return;
  const char *last = g_object_get_data (G_OBJECT (op), "gd-last-warning");
  if (g_strcmp0 (last, error->message) == 0)
    return;
  g_object_set_data_full (G_OBJECT (op), "gd-last-warning", g_strdup (error->message), g_free);
  char *name = NULL;
  GeglNode *node = op->node;
  if (node)
    gegl_node_get (node, "name", &name, NULL);
  /* the id of a chain file ("id=x3") when the node has no name */
  if (node && !(name && *name))
    {
      g_free (name);
      name = g_strdup (g_object_get_data (G_OBJECT (node), "refname"));
    }
  if (name && *name)
    g_warning ("%s (node '%s'): %s", gegl_operation_get_name (op), name, error->message);
  else
    g_warning ("%s: %s", gegl_operation_get_name (op), error->message);
  g_free (name);
}

void
gd_op_clear_warning (GeglOperation *op)
{
  g_object_set_data (G_OBJECT (op), "gd-last-warning", NULL);
}

gboolean
gd_op_plan_begin (GeglOperation *op, GdOpPlanFunc check, GdOpPlan *plan, GError **error)
{
  *plan = (GdOpPlan) { .label = -1 };
  gboolean quiet = FALSE;
  if (check (op, plan, &quiet, error))
    return TRUE;
  if (quiet)
    g_clear_error (error);
  return FALSE;
}

void
gd_op_plan_end (GeglOperation *op, GdOpPlan *plan, GError *error)
{
  if (error)
    {
      gd_op_warn (op, error);
      g_error_free (error);
    }
  g_clear_pointer (&plan->diffusion, gd_diffusion_free);
}

static GQuark
check_quark (void)
{
  return g_quark_from_static_string ("gd-op-check");
}

/* The plan's box, or empty with a warning. */
static GeglRectangle
checked_bounding_box (GeglOperation *op)
{
  GdOpPlanFunc check = (GdOpPlanFunc) g_type_get_qdata (G_OBJECT_TYPE (op), check_quark ());
  GdOpPlan plan;
  GError *error = NULL;
  GeglRectangle box = { 0, 0, 0, 0 };
  if (gd_op_plan_begin (op, check, &plan, &error))
    {
      box = plan.box;
      gd_op_clear_warning (op);
    }
  gd_op_plan_end (op, &plan, error);
  return box;
}

static GeglRectangle
whole_required (GeglOperation *op, const gchar *input_pad, const GeglRectangle *roi)
{
  const GeglRectangle *box = gegl_operation_source_get_bounding_box (op, input_pad);
  return box ? *box : *roi;
}

static GeglRectangle
whole_cached (GeglOperation *op, const GeglRectangle *roi)
{
  (void) roi;
  return gegl_operation_get_bounding_box (op);
}

/* Everything the inputs cover: the output is as large as they are (its own bounding box
 * would need the whole check, at every change of a connection). */
static GeglRectangle
whole_invalidated (GeglOperation *op, const gchar *input_pad, const GeglRectangle *roi)
{
  (void) input_pad;
  GeglRectangle all = *roi;
  static const char *pads[] = { "input", "aux", "aux2" };
  for (guint i = 0; i < G_N_ELEMENTS (pads); i++)
    if (gegl_operation_find_property (gegl_operation_get_name (op), pads[i]))
      {
        const GeglRectangle *box = gegl_operation_source_get_bounding_box (op, pads[i]);
        if (box)
          gegl_rectangle_bounding_box (&all, &all, box);
      }
  return all;
}

/* Property changes: GEGL computes a node's bounding box at each one, while a host may
 * still be setting the rest (the class before it, the pads after).  A problem seen then
 * is not reported; the next check, when the graph is used, reports it. */
static GQuark
dispatch_quark (void)
{
  return g_quark_from_static_string ("gd-op-parent-dispatch");
}

static void
dispatch_properties_changed (GObject *object, guint n_pspecs, GParamSpec **pspecs)
{
  void (*parent) (GObject *, guint, GParamSpec **) =
    g_type_get_qdata (G_OBJECT_TYPE (object), dispatch_quark ());
  int depth = GPOINTER_TO_INT (g_object_get_data (object, "gd-in-notify"));
  g_object_set_data (object, "gd-in-notify", GINT_TO_POINTER (depth + 1));
  parent (object, n_pspecs, pspecs);
  g_object_set_data (object, "gd-in-notify", GINT_TO_POINTER (depth));
}

void
gd_op_class_setup (GeglOperationClass *klass, void (*prepare) (GeglOperation *op),
                   GdOpPlanFunc check, gboolean whole_buffer)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  GType type = G_TYPE_FROM_CLASS (klass);
  g_type_set_qdata (type, dispatch_quark (), object_class->dispatch_properties_changed);
  object_class->dispatch_properties_changed = dispatch_properties_changed;
  g_type_set_qdata (type, check_quark (), (gpointer) check);
  klass->prepare = prepare;
  klass->get_bounding_box = checked_bounding_box;
  if (whole_buffer)
    {
      klass->get_required_for_output = whole_required;
      klass->get_cached_region = whole_cached;
      klass->get_invalidated_by_change = whole_invalidated;
      klass->threaded = FALSE;
      klass->want_in_place = FALSE;
    }
}

static GThread *main_thread;

void
gd_op_remember_main_thread (void)
{
  main_thread = g_thread_self ();
}

void
gd_op_progress (GeglOperation *op, double fraction, const char *message)
{
  if (g_thread_self () != main_thread)
    return;
  char *text = g_strdup (message);
  gegl_operation_progress (op, fraction, text);
  g_free (text);
}
