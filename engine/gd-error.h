/* Error domain of the engine: every failing engine function returns FALSE (or NULL)
 * and sets a GError in this domain whose message names the file and the cause. */
#pragma once
#include <glib.h>

G_BEGIN_DECLS

#define GD_ERROR (gd_error_quark ())
GQuark gd_error_quark (void);

typedef enum {
  GD_ERROR_IO,        /* file cannot be opened, read or written */
  GD_ERROR_FORMAT,    /* file contents malformed */
  GD_ERROR_CONFIG,    /* architecture cannot be built from the configuration */
  GD_ERROR_WEIGHTS,   /* weights missing, extra or of the wrong shape */
  GD_ERROR_INPUT,     /* an input tensor does not fit the model */
  GD_ERROR_CANCELLED, /* a long run was stopped by its caller */
} GdErrorCode;

G_END_DECLS
