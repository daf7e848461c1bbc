"""gmot's torch code, in four rooms whose imports run one way (tasks -> engine -> nn -> ot; all may import
`data`; docs/design.md section 0 is the map):

- `models.ot`: optimal transport (solvers, graph structures, CPU kernels);
- `models.nn`: the encoder, the CTC loss, the PLM teacher, the transfer loss;
- `models.engine`: training (trainer, config, schedule, distributed, precision, checkpoints, run log);
- `models.tasks`: decoding, export, alignment plots.

`tests/test_import_rooms.py` fails on an import against these arrows.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gmot")  # the installed distribution's version; gmot_cli and export read it here
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
