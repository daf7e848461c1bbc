"""torch code: transport, graph structures, the GM-OT loss, encoder, PLM teacher, decoding, training."""
