/* The GEGL module of guided diffusion: registers every gd: operation of ops/ (compiled
 * into this one module with GEGL_OP_BUNDLE). */
#include <gegl-plugin.h>

#include "gd-op-common.h"

static const GeglModuleInfo module_info = { GEGL_MODULE_ABI_VERSION };

void gegl_op_gd_noise_register_type (GTypeModule *module);
void gegl_op_gd_noise_predict_register_type (GTypeModule *module);
void gegl_op_gd_classifier_gradient_register_type (GTypeModule *module);
void gegl_op_gd_scheduler_step_register_type (GTypeModule *module);
void gegl_op_gd_encode_register_type (GTypeModule *module);
void gegl_op_gd_decode_register_type (GTypeModule *module);
void gegl_op_gd_sample_register_type (GTypeModule *module);

G_MODULE_EXPORT const GeglModuleInfo *gegl_module_query (GTypeModule *module);
G_MODULE_EXPORT gboolean gegl_module_register (GTypeModule *module);

G_MODULE_EXPORT const GeglModuleInfo *
gegl_module_query (GTypeModule *module)
{
  (void) module;
  return &module_info;
}

G_MODULE_EXPORT gboolean
gegl_module_register (GTypeModule *module)
{
  gd_op_remember_main_thread ();
  gegl_op_gd_noise_register_type (module);
  gegl_op_gd_noise_predict_register_type (module);
  gegl_op_gd_classifier_gradient_register_type (module);
  gegl_op_gd_scheduler_step_register_type (module);
  gegl_op_gd_encode_register_type (module);
  gegl_op_gd_decode_register_type (module);
  gegl_op_gd_sample_register_type (module);
  return TRUE;
}
