/* The description of the model-config / classifier-config properties of every op that
 * loads a model. */
#pragma once
#define GD_CONFIG_DESCRIPTION \
  "Architecture override for a .pt file that is not a released checkpoint: inline JSON or " \
  "a JSON file, as guided convert --config takes it (empty: none)"
