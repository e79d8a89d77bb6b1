/* Subcommands of the `guided` command line. Each returns the process exit status. */
#pragma once
#include "gd-model.h"

/* Loads a model file; config_argument (inline JSON or a file, may be NULL) overrides what
 * a PyTorch checkpoint's weights leave open (see docs/checkpoints.md). */
GdModel *guided_load_model (const char *path, const char *config_argument, GError **error);

int guided_forward_main (int argc, char **argv);
int guided_sample_main (int argc, char **argv);
int guided_train_main (int argc, char **argv);
int guided_convert_main (int argc, char **argv);
int guided_info_main (int argc, char **argv);
int guided_evaluate_main (int argc, char **argv);
int guided_bench_main (int argc, char **argv);
