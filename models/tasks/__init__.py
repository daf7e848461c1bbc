"""What is done with a trained model: decoding (`decoding`, over the search algorithms in `search`), export to
ONNX for sherpa-onnx and onnxruntime (`export`) and transport-plan pictures (`alignment_plot`).

May import: `models.engine` (checkpoints, diagnostics), `models.nn`, `models.ot`, `data`. Not `gmot_cli`.
"""
