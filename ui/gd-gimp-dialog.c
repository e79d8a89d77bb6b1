/* The dialog of the plug-in: the mode, the two model files (the defaults or files the user
 * picks), the class by name with type-to-search over the model's label list, the sampling
 * settings and the seed.  OK runs in the dialog: its fields are locked, a progress bar
 * counts the steps (GIMP's own progress bar too) and Cancel stops the run at the end of
 * the current step, before anything is added to the image. */
#include "gd-gimp.h"
#include "gd-bf16.h"
#include "gd-error.h"
#include "gd-op-common.h"

#include <libgimp/gimpui.h>
#include <string.h>

enum { FILE_TEXT, FILE_PATH, FILE_OTHER, FILE_N_COLUMNS };

typedef struct Dialog Dialog;

/* A model file chooser: "Default (file)", files picked, "Other file..." */
typedef struct {
  Dialog *d;
  GtkWidget *combo;
  GtkListStore *store;
  gchar *field;           /* the settings' path ("" = default) */
  GdModelKind kind;
  gint previous;          /* the row to go back to when picking a file is cancelled */
} FileCombo;

struct Dialog {
  GdGimpSettings *s;
  GtkWidget *window;
  GtkWidget *fields;                       /* locked while a run goes */
  GtkWidget *ok;
  GtkWidget *modes[GD_GIMP_N_MODES];
  FileCombo model, classifier;
  GtkWidget *model_config, *classifier_config;
  GtkWidget *info;
  GtkWidget *class_combo, *class_entry, *class_status;
  GtkListStore *classes;
  GtkObject *eta, *strength;
  GtkWidget *seed;
  GtkWidget *progress;
  GdModel *model_info, *classifier_info;   /* architectures, for the label list and checks */
  gboolean running, stop;
};

/* ---- what the model files say ---- */

static char *
describe (GdModel *m)
{
  const GdModelConfig *c = gd_model_get_config (m);
  const char *colour = c->in_channels == 1 ? "grayscale" : c->in_channels == 3 ? "RGB" : "multichannel";
  if (c->kind == GD_MODEL_CLASSIFIER)
    return g_strdup_printf ("%dx%d %s, %d classes", c->image_size, c->image_size, colour,
                            c->out_channels);
  if (c->num_classes > 0)
    return g_strdup_printf ("%dx%d %s, class-conditional (%d classes)", c->image_size,
                            c->image_size, colour, c->num_classes);
  return g_strdup_printf ("%dx%d %s", c->image_size, c->image_size, colour);
}

static void class_changed (GtkEditable *editable, Dialog *d);

static void
take_configs (Dialog *d)
{
  GdGimpSettings *s = d->s;
  g_strlcpy (s->model_config, gtk_entry_get_text (GTK_ENTRY (d->model_config)), sizeof s->model_config);
  g_strlcpy (s->classifier_config, gtk_entry_get_text (GTK_ENTRY (d->classifier_config)),
             sizeof s->classifier_config);
}

/* Loads the architectures (a .pt file's weights stay unread) and fills the class list. */
static void
refresh_models (Dialog *d)
{
  GdGimpSettings *s = d->s;
  take_configs (d);
  g_clear_pointer (&d->model_info, gd_model_free);
  g_clear_pointer (&d->classifier_info, gd_model_free);
  GError *model_error = NULL, *classifier_error = NULL;
  d->model_info = gd_gimp_load_model (s->model, s->model_config, GD_MODEL_UNET, TRUE, &model_error);
  d->classifier_info = gd_gimp_load_model (s->classifier, s->classifier_config,
                                           GD_MODEL_CLASSIFIER, TRUE, &classifier_error);
  GString *info = g_string_new (NULL);
  GdModel *models[2] = { d->model_info, d->classifier_info };
  GError *errors[2] = { model_error, classifier_error };
  static const char *const titles[2] = { "Model", "Classifier" };
  for (int i = 0; i < 2; i++)
    {
      char *text = models[i] ? describe (models[i]) : g_strdup (errors[i]->message);
      char *escaped = g_markup_escape_text (text, -1);
      g_string_append_printf (info, "%s%s: %s%s%s", i ? "\n" : "", titles[i],
                              models[i] ? "" : "<span foreground=\"#c00000\">", escaped,
                              models[i] ? "" : "</span>");
      g_free (escaped);
      g_free (text);
    }
  g_clear_error (&model_error);
  g_clear_error (&classifier_error);

  const char *origin = NULL;
  GPtrArray *labels = gd_gimp_labels (d->classifier_info, d->model_info, &origin);
  gtk_list_store_clear (d->classes);
  GtkTreeIter iter;
  if (labels)
    {
      char *base = g_path_get_basename (origin);
      g_string_append_printf (info, "\n%u class names from %s", labels->len, base);
      g_free (base);
      for (guint i = 0; i < labels->len; i++)
        gtk_list_store_insert_with_values (d->classes, &iter, -1, 0, labels->pdata[i], -1);
      g_ptr_array_unref (labels);
    }
  else if (d->classifier_info || d->model_info)
    {
      GdModel *m = d->classifier_info ? d->classifier_info : d->model_info;
      const GdModelConfig *c = gd_model_get_config (m);
      int count = c->kind == GD_MODEL_CLASSIFIER ? c->out_channels : c->num_classes;
      g_string_append (info, "\nNo class names: classes are numbers");
      for (int i = 0; i < count; i++)
        {
          char number[16];
          g_snprintf (number, sizeof number, "%d", i);
          gtk_list_store_insert_with_values (d->classes, &iter, -1, 0, number, -1);
        }
    }
  gtk_label_set_markup (GTK_LABEL (d->info), info->str);
  g_string_free (info, TRUE);
  class_changed (GTK_EDITABLE (d->class_entry), d);
}

/* ---- model files ---- */

static void
file_combo_select_path (FileCombo *f, const char *path)
{
  GtkTreeModel *model = GTK_TREE_MODEL (f->store);
  GtkTreeIter iter;
  gboolean valid = gtk_tree_model_get_iter_first (model, &iter);
  while (valid)
    {
      gchar *row_path;
      gboolean other;
      gtk_tree_model_get (model, &iter, FILE_PATH, &row_path, FILE_OTHER, &other, -1);
      gboolean found = !other && g_strcmp0 (row_path, path) == 0;
      g_free (row_path);
      if (found)
        {
          gtk_combo_box_set_active_iter (GTK_COMBO_BOX (f->combo), &iter);
          return;
        }
      valid = gtk_tree_model_iter_next (model, &iter);
    }
  /* a file not listed yet: before "Other file..." */
  gint rows = gtk_tree_model_iter_n_children (model, NULL);
  char *base = g_path_get_basename (path), *dir = g_path_get_dirname (path);
  char *text = g_strdup_printf ("%s (%s)", base, dir);
  gtk_list_store_insert_with_values (f->store, &iter, rows - 1, FILE_TEXT, text, FILE_PATH, path,
                                     FILE_OTHER, FALSE, -1);
  g_free (text);
  g_free (dir);
  g_free (base);
  gtk_combo_box_set_active_iter (GTK_COMBO_BOX (f->combo), &iter);
}

static char *
pick_file (FileCombo *f)
{
  GtkWidget *chooser = gtk_file_chooser_dialog_new (
    f->kind == GD_MODEL_UNET ? "Choose a diffusion model" : "Choose a noisy classifier",
    GTK_WINDOW (f->d->window), GTK_FILE_CHOOSER_ACTION_OPEN,
    GTK_STOCK_CANCEL, GTK_RESPONSE_CANCEL, GTK_STOCK_OPEN, GTK_RESPONSE_ACCEPT, NULL);
  GtkFileFilter *models = gtk_file_filter_new ();
  gtk_file_filter_set_name (models, "Model files (*.safetensors, *.pt, *.pth)");
  gtk_file_filter_add_pattern (models, "*.safetensors");
  gtk_file_filter_add_pattern (models, "*.pt");
  gtk_file_filter_add_pattern (models, "*.pth");
  gtk_file_chooser_add_filter (GTK_FILE_CHOOSER (chooser), models);
  GtkFileFilter *all = gtk_file_filter_new ();
  gtk_file_filter_set_name (all, "All files");
  gtk_file_filter_add_pattern (all, "*");
  gtk_file_chooser_add_filter (GTK_FILE_CHOOSER (chooser), all);
  if (*f->field)
    gtk_file_chooser_set_filename (GTK_FILE_CHOOSER (chooser), f->field);
  char *file = NULL;
  if (gtk_dialog_run (GTK_DIALOG (chooser)) == GTK_RESPONSE_ACCEPT)
    file = gtk_file_chooser_get_filename (GTK_FILE_CHOOSER (chooser));
  gtk_widget_destroy (chooser);
  return file;
}

static void
file_combo_changed (GtkComboBox *combo, FileCombo *f)
{
  GtkTreeIter iter;
  if (!gtk_combo_box_get_active_iter (combo, &iter))
    return;
  gchar *path;
  gboolean other;
  gtk_tree_model_get (GTK_TREE_MODEL (f->store), &iter, FILE_PATH, &path, FILE_OTHER, &other, -1);
  if (other)
    {
      char *file = pick_file (f);
      if (file)
        file_combo_select_path (f, file);   /* emits "changed" again */
      else
        gtk_combo_box_set_active (combo, f->previous);
      g_free (file);
      g_free (path);
      return;
    }
  f->previous = gtk_combo_box_get_active (combo);
  g_strlcpy (f->field, path ? path : "", GD_GIMP_PATH_SIZE);
  g_free (path);
  refresh_models (f->d);
}

static GtkWidget *
file_combo_new (FileCombo *f, Dialog *d, gchar *field, GdModelKind kind)
{
  *f = (FileCombo) { .d = d, .field = field, .kind = kind };
  f->store = gtk_list_store_new (FILE_N_COLUMNS, G_TYPE_STRING, G_TYPE_STRING, G_TYPE_BOOLEAN);
  GError *error = NULL;
  char *found = gd_default_model_path (kind, &error);
  char *base = found ? g_path_get_basename (found) : NULL;
  char *text = found ? g_strdup_printf ("Default (%s)", base) : g_strdup ("Default (not installed)");
  gtk_list_store_insert_with_values (f->store, NULL, -1, FILE_TEXT, text, FILE_PATH, "",
                                     FILE_OTHER, FALSE, -1);
  gtk_list_store_insert_with_values (f->store, NULL, -1, FILE_TEXT, "Other file...",
                                     FILE_PATH, NULL, FILE_OTHER, TRUE, -1);
  g_free (text);
  g_free (base);
  g_free (found);
  g_clear_error (&error);
  f->combo = gtk_combo_box_new_with_model (GTK_TREE_MODEL (f->store));
  g_object_unref (f->store);
  GtkCellRenderer *cell = gtk_cell_renderer_text_new ();
  g_object_set (cell, "ellipsize", PANGO_ELLIPSIZE_MIDDLE, "width-chars", 40, NULL);
  gtk_cell_layout_pack_start (GTK_CELL_LAYOUT (f->combo), cell, TRUE);
  gtk_cell_layout_set_attributes (GTK_CELL_LAYOUT (f->combo), cell, "text", FILE_TEXT, NULL);
  if (*field)
    file_combo_select_path (f, field);
  else
    gtk_combo_box_set_active (GTK_COMBO_BOX (f->combo), 0);
  f->previous = gtk_combo_box_get_active (GTK_COMBO_BOX (f->combo));
  g_signal_connect (f->combo, "changed", G_CALLBACK (file_combo_changed), f);
  return f->combo;
}

static gboolean
config_left (GtkWidget *entry, GdkEventFocus *event, Dialog *d)
{
  (void) entry;
  (void) event;
  refresh_models (d);
  return FALSE;
}

/* ---- the class ---- */

/* Type-to-search: a name matches when it contains what was typed, in any case. */
static gboolean
class_matches (GtkEntryCompletion *completion, const gchar *key, GtkTreeIter *iter, gpointer data)
{
  (void) data;
  gchar *name;
  gtk_tree_model_get (gtk_entry_completion_get_model (completion), iter, 0, &name, -1);
  gboolean hit = FALSE;
  if (name)
    {
      gchar *normal = g_utf8_normalize (name, -1, G_NORMALIZE_ALL);
      gchar *folded = normal ? g_utf8_casefold (normal, -1) : NULL;
      hit = folded && strstr (folded, key) != NULL;
      g_free (folded);
      g_free (normal);
    }
  g_free (name);
  return hit;
}

static void
class_changed (GtkEditable *editable, Dialog *d)
{
  const char *text = gtk_entry_get_text (GTK_ENTRY (editable));
  g_strlcpy (d->s->class_name, text, sizeof d->s->class_name);
  char *status;
  int64_t chosen = -1;
  GError *error = NULL;
  if (!d->model_info)
    status = g_strdup ("");
  else if (!gd_gimp_resolve_class (d->classifier_info, d->model_info, text, &chosen, &error))
    {
      char *escaped = g_markup_escape_text (error->message, -1);
      status = g_strdup_printf ("<span foreground=\"#c00000\">%s</span>", escaped);
      g_free (escaped);
      g_error_free (error);
    }
  else if (chosen < 0)
    status = g_strdup ("Empty: a class drawn from the seed for each image");
  else
    status = g_strdup_printf ("Class %" G_GINT64_FORMAT " of %d", chosen,
                              gtk_tree_model_iter_n_children (GTK_TREE_MODEL (d->classes), NULL));
  gtk_label_set_markup (GTK_LABEL (d->class_status), status);
  g_free (status);
}

static GtkWidget *
class_combo_new (Dialog *d)
{
  d->classes = gtk_list_store_new (1, G_TYPE_STRING);
  d->class_combo = gtk_combo_box_new_with_model_and_entry (GTK_TREE_MODEL (d->classes));
  g_object_unref (d->classes);
  gtk_combo_box_set_entry_text_column (GTK_COMBO_BOX (d->class_combo), 0);
  d->class_entry = gtk_bin_get_child (GTK_BIN (d->class_combo));
  gtk_entry_set_text (GTK_ENTRY (d->class_entry), d->s->class_name);
  gtk_widget_set_tooltip_text (d->class_entry,
                               "Type part of a class name to search the list; empty draws a class from the seed");
  GtkEntryCompletion *completion = gtk_entry_completion_new ();
  gtk_entry_completion_set_model (completion, GTK_TREE_MODEL (d->classes));
  gtk_entry_completion_set_text_column (completion, 0);
  gtk_entry_completion_set_match_func (completion, class_matches, NULL, NULL);
  gtk_entry_completion_set_minimum_key_length (completion, 1);
  gtk_entry_set_completion (GTK_ENTRY (d->class_entry), completion);
  g_object_unref (completion);
  g_signal_connect (d->class_entry, "changed", G_CALLBACK (class_changed), d);
  return d->class_combo;
}

/* ---- the rest of the fields ---- */

static void
update_sensitivity (Dialog *d)
{
  gboolean ddim = d->s->sampler == GD_OP_SAMPLER_DDIM;
  gimp_scale_entry_set_sensitive (d->eta, ddim);
  gimp_scale_entry_set_sensitive (d->strength, d->s->mode != GD_GIMP_GENERATE);
}

static void
mode_toggled (GtkWidget *button, Dialog *d)
{
  gimp_radio_button_update (button, &d->s->mode);
  update_sensitivity (d);
}

static void
sampler_changed (GtkWidget *combo, Dialog *d)
{
  gimp_int_combo_box_get_active (GIMP_INT_COMBO_BOX (combo), &d->s->sampler);
  update_sensitivity (d);
}

static GtkObject *
scale_entry (GtkWidget *table, int row, const char *text, double value, double lower,
             double upper, double step, int digits, double hard_lower, double hard_upper,
             const char *tooltip, gpointer field, gboolean integer)
{
  GtkObject *adj = gimp_scale_entry_new (GTK_TABLE (table), 0, row, text, 200, 6, value, lower,
                                         upper, step, step * 10, digits, FALSE, hard_lower,
                                         hard_upper, tooltip, NULL);
  g_signal_connect (adj, "value-changed",
                    integer ? G_CALLBACK (gimp_int_adjustment_update)
                            : G_CALLBACK (gimp_double_adjustment_update), field);
  return adj;
}

static GtkWidget *
framed (GtkWidget *box, const char *title, GtkWidget *child)
{
  GtkWidget *frame = gimp_frame_new (title);
  gtk_container_add (GTK_CONTAINER (frame), child);
  gtk_box_pack_start (GTK_BOX (box), frame, FALSE, FALSE, 0);
  return frame;
}

static GtkWidget *
wrapped_label (void)
{
  GtkWidget *label = gtk_label_new (NULL);
  gtk_label_set_line_wrap (GTK_LABEL (label), TRUE);
  gtk_misc_set_alignment (GTK_MISC (label), 0.0, 0.5);
  gimp_label_set_attributes (GTK_LABEL (label), PANGO_ATTR_SCALE, PANGO_SCALE_SMALL, -1);
  return label;
}

static void
build (Dialog *d, gint32 image, gint32 drawable)
{
  GdGimpSettings *s = d->s;
  d->window = gimp_dialog_new ("Guided Diffusion", GD_GIMP_BINARY, NULL, 0,
                               gimp_standard_help_func, GD_GIMP_PROCEDURE,
                               "_Cancel", GTK_RESPONSE_CANCEL, NULL);
  d->ok = gimp_dialog_add_button (GIMP_DIALOG (d->window), "_OK", GTK_RESPONSE_OK);
  gtk_dialog_set_alternative_button_order (GTK_DIALOG (d->window), GTK_RESPONSE_OK,
                                           GTK_RESPONSE_CANCEL, -1);
  gimp_window_set_transient (GTK_WINDOW (d->window));

  GtkWidget *outer = gtk_vbox_new (FALSE, 12);
  gtk_container_set_border_width (GTK_CONTAINER (outer), 12);
  gtk_box_pack_start (GTK_BOX (gtk_dialog_get_content_area (GTK_DIALOG (d->window))), outer,
                      TRUE, TRUE, 0);
  d->fields = gtk_vbox_new (FALSE, 12);
  gtk_box_pack_start (GTK_BOX (outer), d->fields, TRUE, TRUE, 0);

  /* mode: inpainting needs a selection, varying and inpainting a layer */
  gboolean has_selection = !gimp_selection_is_empty (image);
  gboolean has_layer = drawable > 0 && (gimp_item_is_layer (drawable) || gimp_item_is_layer_mask (drawable));
  if ((s->mode == GD_GIMP_INPAINT && !(has_selection && has_layer))
      || (s->mode == GD_GIMP_VARY && !has_layer))
    s->mode = GD_GIMP_GENERATE;
  GtkWidget *modes = gimp_int_radio_group_new (
    TRUE, "Mode", G_CALLBACK (mode_toggled), d, s->mode,
    "_Generate: each image a new layer", GD_GIMP_GENERATE, &d->modes[GD_GIMP_GENERATE],
    "_Vary the active layer", GD_GIMP_VARY, &d->modes[GD_GIMP_VARY],
    "_Inpaint the selection (a new layer over the original)", GD_GIMP_INPAINT, &d->modes[GD_GIMP_INPAINT],
    NULL);
  gtk_widget_set_sensitive (d->modes[GD_GIMP_VARY], has_layer);
  gtk_widget_set_sensitive (d->modes[GD_GIMP_INPAINT], has_selection && has_layer);
  gtk_box_pack_start (GTK_BOX (d->fields), modes, FALSE, FALSE, 0);

  /* models */
  GtkWidget *table = gtk_table_new (3, 2, FALSE);
  gtk_table_set_row_spacings (GTK_TABLE (table), 6);
  gtk_table_set_col_spacings (GTK_TABLE (table), 6);
  d->info = wrapped_label ();
  d->class_status = wrapped_label ();
  class_combo_new (d);
  d->model_config = gtk_entry_new ();
  d->classifier_config = gtk_entry_new ();
  gtk_entry_set_text (GTK_ENTRY (d->model_config), s->model_config);
  gtk_entry_set_text (GTK_ENTRY (d->classifier_config), s->classifier_config);
  gimp_table_attach_aligned (GTK_TABLE (table), 0, 0, "Diffusion _model:", 0.0, 0.5,
                             file_combo_new (&d->model, d, s->model, GD_MODEL_UNET), 1, FALSE);
  gimp_table_attach_aligned (GTK_TABLE (table), 0, 1, "C_lassifier:", 0.0, 0.5,
                             file_combo_new (&d->classifier, d, s->classifier, GD_MODEL_CLASSIFIER),
                             1, FALSE);
  gtk_table_attach (GTK_TABLE (table), d->info, 1, 2, 2, 3, GTK_FILL | GTK_EXPAND, GTK_FILL, 0, 0);
  GtkWidget *box = gtk_vbox_new (FALSE, 6);
  gtk_box_pack_start (GTK_BOX (box), table, FALSE, FALSE, 0);
  GtkWidget *expander = gtk_expander_new_with_mnemonic ("Architecture of .pt files that are not released chec_kpoints");
  GtkWidget *configs = gtk_table_new (2, 2, FALSE);
  gtk_table_set_row_spacings (GTK_TABLE (configs), 6);
  gtk_table_set_col_spacings (GTK_TABLE (configs), 6);
  gtk_container_set_border_width (GTK_CONTAINER (configs), 6);
  gimp_table_attach_aligned (GTK_TABLE (configs), 0, 0, "Model (_JSON or file):", 0.0, 0.5,
                             d->model_config, 1, FALSE);
  gimp_table_attach_aligned (GTK_TABLE (configs), 0, 1, "Classifier (JSON or _file):", 0.0, 0.5,
                             d->classifier_config, 1, FALSE);
  GtkWidget *entries[2] = { d->model_config, d->classifier_config };
  for (int i = 0; i < 2; i++)
    {
      g_signal_connect_swapped (entries[i], "activate", G_CALLBACK (refresh_models), d);
      g_signal_connect (entries[i], "focus-out-event", G_CALLBACK (config_left), d);
    }
  gtk_container_add (GTK_CONTAINER (expander), configs);
  gtk_expander_set_expanded (GTK_EXPANDER (expander), *s->model_config || *s->classifier_config);
  gtk_box_pack_start (GTK_BOX (box), expander, FALSE, FALSE, 0);
  framed (d->fields, "Models", box);

  /* class */
  GtkWidget *class_table = gtk_table_new (2, 2, FALSE);
  gtk_table_set_row_spacings (GTK_TABLE (class_table), 6);
  gtk_table_set_col_spacings (GTK_TABLE (class_table), 6);
  gimp_table_attach_aligned (GTK_TABLE (class_table), 0, 0, "Cl_ass:", 0.0, 0.5, d->class_combo, 1, FALSE);
  gtk_table_attach (GTK_TABLE (class_table), d->class_status, 1, 2, 1, 2, GTK_FILL | GTK_EXPAND, GTK_FILL, 0, 0);
  framed (d->fields, "Guide toward", class_table);

  /* sampling */
  GtkWidget *sampling = gtk_table_new (8, 3, FALSE);
  gtk_table_set_row_spacings (GTK_TABLE (sampling), 6);
  gtk_table_set_col_spacings (GTK_TABLE (sampling), 6);
  scale_entry (sampling, 0, "Guidance _scale:", s->guidance_scale, 0.0, 30.0, 0.1, 1, -1000.0, 1000.0,
               "Scale of the classifier gradient; 0 samples without guidance", &s->guidance_scale, FALSE);
  scale_entry (sampling, 1, "S_teps:", s->steps, 1, 250, 1, 0, 1, 10000,
               "Sampling steps (respaced: DDIM takes every (1000 / steps)-th timestep)", &s->steps, TRUE);
  GtkWidget *sampler = gimp_int_combo_box_new ("DDIM", GD_OP_SAMPLER_DDIM, "DDPM", GD_OP_SAMPLER_DDPM, NULL);
  gimp_int_combo_box_set_active (GIMP_INT_COMBO_BOX (sampler), s->sampler);
  g_signal_connect (sampler, "changed", G_CALLBACK (sampler_changed), d);
  gimp_table_attach_aligned (GTK_TABLE (sampling), 0, 2, "Sam_pler:", 0.0, 0.5, sampler, 2, TRUE);
  d->eta = scale_entry (sampling, 3, "_Eta:", s->eta, 0.0, 1.0, 0.01, 2, 0.0, 10.0,
                        "DDIM noise: 0 is deterministic", &s->eta, FALSE);
  d->strength = scale_entry (sampling, 4, "Stre_ngth:", s->strength, 0.0, 1.0, 0.01, 2, 0.0, 1.0,
                             "Vary and inpaint: how far the layer is noised (0 keeps it, 1 starts from noise)",
                             &s->strength, FALSE);
  scale_entry (sampling, 5, "N_umber of images:", s->n_images, 1, 16, 1, 0, 1, 64,
               "Images to make, each a new layer", &s->n_images, TRUE);
  d->seed = gimp_random_seed_new (&s->seed, &s->random_seed);
  GtkWidget *seed_label = gimp_table_attach_aligned (GTK_TABLE (sampling), 0, 6, "See_d:", 0.0, 0.5,
                                                     d->seed, 2, TRUE);
  gtk_label_set_mnemonic_widget (GTK_LABEL (seed_label), GIMP_RANDOM_SEED_SPINBUTTON (d->seed));
  GtkWidget *bf16 = gtk_check_button_new_with_mnemonic ("_bf16: faster, very slightly less exact");
  if (gd_bf16_kernel ())
    {
      gtk_toggle_button_set_active (GTK_TOGGLE_BUTTON (bf16), s->bf16);
      char *tip = g_strdup_printf ("Run the models' convolutions in bfloat16 with float sums "
                                   "(this processor: %s)", gd_bf16_kernel ());
      gimp_help_set_help_data (bf16, tip, NULL);
      g_free (tip);
    }
  else
    {
      s->bf16 = FALSE;
      gtk_widget_set_sensitive (bf16, FALSE);
      gimp_help_set_help_data (bf16, "This processor has neither AMX-BF16 nor AVX512-BF16", NULL);
    }
  g_signal_connect (bf16, "toggled", G_CALLBACK (gimp_toggle_button_update), &s->bf16);
  gtk_table_attach (GTK_TABLE (sampling), bf16, 1, 3, 7, 8, GTK_FILL, GTK_FILL, 0, 0);
  framed (d->fields, "Sampling", sampling);

  d->progress = gtk_progress_bar_new ();
  gtk_progress_bar_set_text (GTK_PROGRESS_BAR (d->progress), " ");
  gtk_box_pack_start (GTK_BOX (outer), d->progress, FALSE, FALSE, 0);

  update_sensitivity (d);
  refresh_models (d);
  gtk_widget_show_all (d->window);
}

/* ---- running ---- */

static gboolean
dialog_step (gpointer user, int done, int total)
{
  Dialog *d = user;
  if (d->stop)
    gtk_progress_bar_set_text (GTK_PROGRESS_BAR (d->progress), "Stopping after this step...");
  else if (total > 0)
    {
      char text[64];
      g_snprintf (text, sizeof text, "Step %d of %d", done, total);
      gtk_progress_bar_set_text (GTK_PROGRESS_BAR (d->progress), text);
      gtk_progress_bar_set_fraction (GTK_PROGRESS_BAR (d->progress), (double) done / total);
    }
  else
    {
      gtk_progress_bar_set_text (GTK_PROGRESS_BAR (d->progress), "Loading the models...");
      gtk_progress_bar_pulse (GTK_PROGRESS_BAR (d->progress));
    }
  while (gtk_events_pending ())
    gtk_main_iteration ();
  return !d->stop;
}

static void
response (GtkWidget *window, gint id, Dialog *d)
{
  (void) window;
  if (d->running && id != GTK_RESPONSE_OK)
    d->stop = TRUE;
}

static void
set_running (Dialog *d, gboolean running)
{
  d->running = running;
  gtk_widget_set_sensitive (d->fields, !running);
  gtk_widget_set_sensitive (d->ok, !running);
  if (!running)
    {
      gtk_progress_bar_set_fraction (GTK_PROGRESS_BAR (d->progress), 0.0);
      gtk_progress_bar_set_text (GTK_PROGRESS_BAR (d->progress), " ");
    }
}

gboolean
gd_gimp_dialog (GdGimpSettings *s, gint32 image, gint32 drawable, GArray *layers)
{
  gimp_ui_init (GD_GIMP_BINARY, FALSE);
  Dialog d = { .s = s };
  build (&d, image, drawable);
  g_signal_connect (d.window, "response", G_CALLBACK (response), &d);
  gboolean done = FALSE;
  while (!done && gimp_dialog_run (GIMP_DIALOG (d.window)) == GTK_RESPONSE_OK)
    {
      take_configs (&d);
      if (s->random_seed)
        {
          s->seed = (guint32) g_random_int_range (0, G_MAXINT32);
          gtk_adjustment_set_value (GTK_ADJUSTMENT (GIMP_RANDOM_SEED_SPINBUTTON_ADJ (d.seed)), s->seed);
        }
      /* remembered now: Cancel in GIMP's progress bar ends the plug-in at once */
      gimp_set_data (GD_GIMP_PROCEDURE, s, sizeof *s);
      d.stop = FALSE;
      set_running (&d, TRUE);
      GdGimpProgress progress = { .step = dialog_step, .user = &d };
      GError *error = NULL;
      done = gd_gimp_run (s, image, drawable, &progress, layers, &error);
      set_running (&d, FALSE);
      if (done)
        break;
      if (g_error_matches (error, GD_ERROR, GD_ERROR_CANCELLED))
        {
          g_error_free (error);
          break;
        }
      gimp_message (error->message);
      g_error_free (error);
    }
  gtk_widget_destroy (d.window);
  gd_model_free (d.model_info);
  gd_model_free (d.classifier_info);
  return done;
}
