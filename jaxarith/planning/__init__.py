"""Plan programs for TPU slices from any machine (libtpu abstract topologies, no TPU needed):
:mod:`jaxarith.planning.slices` (slice names, devices, per-chip bytes) and
:mod:`jaxarith.planning.inference` (generation and lm-eval scoring); ``train.plan`` plans a train
step."""
