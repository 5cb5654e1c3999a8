"""The capture stage: calibration data through a model, per-layer input statistics (and loss
gradients) into a statistics store.

    stage.py       capture(): arguments checked, model loaded, feed built, loop run, store written
    feeds/         what the loop forwards, one module per kind of input (text, vision, diffusion)
    stream.py      the loop over the whole model, batch by batch (checkpoints every N batches)
    layerwise.py   the loop one block at a time (blocks.py finds the blocks and their calls)
    recorder.py    the hooks both loops sum statistics with (stats.py: the Gram updates)
    gradients.py   the training loss's weight gradients (--gradients)
    signals.py     SIGINT/SIGTERM as a request to save and stop
"""

from .stage import capture, parse_shard

__all__ = ["capture", "parse_shard"]
