"""Public layers of keras-reformer."""

from keras_reformer.lsh.lsh_attention import LSHAttention  # noqa: F401
from keras_reformer.local.local_attention import LocalAttention  # noqa: F401
from keras_reformer.layers.reversible_sequence import ReversibleSequence  # noqa: F401
from keras_reformer.layers.chunked_feed_forward import ChunkedFeedForward  # noqa: F401
from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding  # noqa: F401
from keras_reformer.layers.reformer_blocks import AttentionBlock, FeedForwardBlock  # noqa: F401
from keras_reformer.layers.sinusoidal_position_embedding import (  # noqa: F401
    SinusoidalPositionEmbedding,
)
from keras_reformer.layers.short_convolution import ShortConvolution  # noqa: F401
from keras_reformer.layers.token_id_check import TokenIdCheck  # noqa: F401
