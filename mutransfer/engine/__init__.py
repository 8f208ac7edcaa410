"""What muP is: the rules (spectral: width; depth; Muon's step), how each parameter is used (shapes,
traced from a forward pass; residual branches), the per-parameter plan as plain data, and applying it to
a model (parametrize). Pure of I/O, recipes and training: everything above builds on this."""
