"""``python -m qwt2_onnx``: the ``qwt2-onnx`` command line."""
from .entry import main

main()
