"""torch code: transport solvers, graph structures, the GM-OT loss, encoder, PLM teacher, decoding, training."""
