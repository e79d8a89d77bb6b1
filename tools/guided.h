/* Subcommands of the `guided` command line. Each returns the process exit status. */
#pragma once

int guided_forward_main (int argc, char **argv);
int guided_sample_main (int argc, char **argv);
int guided_train_main (int argc, char **argv);
int guided_convert_main (int argc, char **argv);
int guided_info_main (int argc, char **argv);
int guided_evaluate_main (int argc, char **argv);
int guided_bench_main (int argc, char **argv);
