/* guided: the command line of the guided-diffusion engine. */
#include "guided.h"
#include "gd-checkpoint.h"
#include "gd-parallel.h"

#include <glib.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

static const struct {
  const char *name;
  int (*main) (int argc, char **argv);
  const char *summary;
} commands[] = {
  { "sample", guided_sample_main, "generate images, guided by a classifier" },
  { "train", guided_train_main, "train a diffusion model or a noisy classifier" },
  { "evaluate", guided_evaluate_main, "judge guided samples across guidance scales" },
  { "bench", guided_bench_main, "measure the engine's speed on the released architectures" },
  { "forward", guided_forward_main, "run a model on the tensors of a safetensors file" },
  { "convert", guided_convert_main, "write a model (.pt or .safetensors) as self-describing safetensors" },
  { "info", guided_info_main, "describe a model file: release, architecture, diffusion, labels" },
};

GdModel *
guided_load_model (const char *path, const char *config_argument, GError **error)
{
  if (!config_argument)
    return gd_model_load (path, error);
  char *config = gd_checkpoint_read_config (config_argument, error);
  if (!config)
    return NULL;
  GdLoadOptions options = { .config = config };
  GdModel *model = gd_checkpoint_load (path, &options, error);
  g_free (config);
  return model;
}

static void
usage (FILE *out)
{
  fprintf (out, "usage: guided COMMAND [ARGS...]\n\ncommands:\n");
  for (guint i = 0; i < G_N_ELEMENTS (commands); i++)
    fprintf (out, "  %-10s %s\n", commands[i].name, commands[i].summary);
  fprintf (out, "\n'guided COMMAND --help' describes each command.\n");
}

int
main (int argc, char **argv)
{
  gd_parallel_prefer_sleeping_threads (argv);
  /* GD_THREADS: worker threads of the numeric core (default: every core) */
  const char *threads = g_getenv ("GD_THREADS");
  if (threads)
    {
      long count = strtol (threads, NULL, 10);
      if (count < 1 || count > 1024)
        {
          fprintf (stderr, "guided: GD_THREADS=%s is not a thread count\n", threads);
          return 2;
        }
    }
  if (argc < 2)
    {
      usage (stderr);
      return 2;
    }
  if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0 || strcmp (argv[1], "help") == 0)
    {
      usage (stdout);
      return 0;
    }
  for (guint i = 0; i < G_N_ELEMENTS (commands); i++)
    if (strcmp (argv[1], commands[i].name) == 0)
      return commands[i].main (argc - 1, argv + 1);
  fprintf (stderr, "guided: unknown command '%s'\n", argv[1]);
  usage (stderr);
  return 2;
}
