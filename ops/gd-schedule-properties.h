/* The properties that say which respaced process a node works in, shared by every op
 * that takes them so that one setting means the same timesteps in each node.  Included
 * inside the GEGL_PROPERTIES section of an op (gegl-op.h reads it once per pass). */
property_int (steps, "Steps", 50)
  description ("Number of sampling steps (the respacing ddimN for DDIM, N for DDPM)")
  value_range (1, 100000)
  ui_range (1, 1000)
property_string (respacing, "Respacing", "")
  description ("Timestep respacing instead of steps: \"250\", \"ddim25\", \"10,15,20\"")
property_enum (sampler, "Sampler", GdOpSampler, gd_op_sampler, GD_OP_SAMPLER_DDIM)
  description ("ddim (Algorithm 2 of Dhariwal & Nichol 2021) or ddpm (Algorithm 1); also which respacing `steps` means")
