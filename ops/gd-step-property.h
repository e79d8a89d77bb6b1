/* The respaced step a per-step node works at, the same property in every such node.
 * Included inside the GEGL_PROPERTIES section of an op (gegl-op.h reads it once per pass). */
property_int (step, "Step", 0)
  description ("Respaced step k of x_t: steps - 1 is the noisiest, 0 the last")
  value_range (0, 100000)
  ui_range (0, 1000)
