"""Turn an existing Keras text classifier into a long-input one.

The classifier below is written the usual way (Embedding with mask_zero ->
MultiHeadAttention -> pooling -> Dense). Two changes make it a long-input
model, without touching anything else:

1. swap `keras.layers.MultiHeadAttention` for `kr.layers.LSHAttention` at the
   same call site (same constructor names, same call);
2. wrap its own residual blocks in `kr.layers.ReversibleSequence`, so that
   activation memory no longer grows with depth.

Each variant is trained with fit, saved as .keras, reloaded, and checked to
predict the same.

    python examples/mix_into_keras.py            # sequences of 2048 tokens
    python examples/mix_into_keras.py --smoke
"""

import argparse
import os
import sys
import tempfile

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)
import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_reformer as kr  # noqa: E402

VOCAB = 64


def make_data(n, length, seed):
    """Label: does token 3 occur more often than token 4? (padded rows)"""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, length)).astype("int32")
    for row in ids:  # ragged lengths: pad the tail with 0
        row[rng.integers(length // 2, length + 1):] = 0
    labels = ((ids == 3).sum(1) > (ids == 4).sum(1)).astype("int32")
    return ids, labels


def classifier(attention_cls, width=64):
    """The existing model; only `attention_cls` differs between variants."""
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, width, mask_zero=True)(tokens)
    x = attention_cls(num_heads=4, key_dim=16)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))


@keras.saving.register_keras_serializable(package="mix_into_keras")
class AttentionHalf(keras.layers.Layer):
    """The user's own attention block: LayerNorm -> attention (self, masked)."""

    def __init__(self, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.norm = keras.layers.LayerNormalization()
        self.attention = kr.layers.LSHAttention(num_heads=4, key_dim=16, seed=seed)

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.attention.build(input_shape)

    def call(self, x, mask=None, training=None):
        y = self.norm(x)
        return self.attention(y, y, query_mask=mask, training=training)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def reversible_classifier(width=64, depth=4):
    """The same classifier, its blocks stacked reversibly (two streams)."""
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, width, mask_zero=True)(tokens)
    blocks = [
        (AttentionHalf(seed=i),
         keras.Sequential([keras.layers.LayerNormalization(),
                           kr.layers.ChunkedFeedForward(2 * width, chunk_size=256,
                                                        seed=100 + i)]))
        for i in range(depth)
    ]
    y1, y2 = kr.layers.ReversibleSequence(blocks)([x, x])
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Concatenate()([y1, y2]))
    return keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))


def train_and_reload(name, model, data, epochs, batch_size, folder):
    (x, y), (vx, vy) = data
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch_size, validation_data=(vx, vy),
              verbose=2)
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    same = np.allclose(model.predict(vx, verbose=0), reloaded.predict(vx, verbose=0),
                       atol=1e-5)
    accuracy = model.evaluate(vx, vy, verbose=0)[1]
    print(f"{name}: validation accuracy {accuracy:.3f}; saved to {path}; "
          f"reloaded predictions identical: {same}")
    if not same:
        raise SystemExit(f"{name}: reloaded model predicts differently")
    return accuracy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="folder for the .keras files")
    args = p.parse_args(argv)
    if args.smoke:
        args.length, args.samples, args.epochs = 128, 32, 1
    keras.utils.set_random_seed(0)
    data = (make_data(args.samples, args.length, 0),
            make_data(args.samples // 4, args.length, 1))
    folder = args.out or tempfile.mkdtemp(prefix="mix_into_keras_")
    os.makedirs(folder, exist_ok=True)
    if args.length <= 4096:  # quadratic memory: the original only for short inputs
        train_and_reload("multi_head_attention", classifier(keras.layers.MultiHeadAttention),
                         data, args.epochs, 16, folder)
    train_and_reload("lsh_attention", classifier(kr.layers.LSHAttention),
                     data, args.epochs, 16, folder)
    train_and_reload("reversible", reversible_classifier(), data, args.epochs, 16, folder)


if __name__ == "__main__":
    main()
