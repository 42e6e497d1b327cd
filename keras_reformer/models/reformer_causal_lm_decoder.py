"""Cached decoding of a `ReformerBackbone`: a prompt pass that fills one cache
per attention layer, and one-token steps that read and extend them.

At inference a reversible block is `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`, and
everything but attention acts on each position alone. So a step runs the
backbone's own layers on one token per row: the token embedding, the
position embedding at that row's position, the short convolution over the
row's last inputs (if any), then per block `AttentionBlock.call_with_cache`
and the feed-forward block itself (each block under
`ReversibleSequence.block_scope`, which gives it its stacked weights when
there are), and at the end the final norm and the task's head. A step costs
the same whatever the length before it, and its logits equal the full pass
over the same tokens (tested).

`ReformerCausalLM.call_with_cache` drives this from keras-hub's samplers;
`CachedDecoder.generate` is the same decoding as one `tf.while_loop` with
stateless sampling, for the exported SavedModel signatures (core TF ops,
caches updated in place in graph mode).
"""

import keras
import tensorflow as tf

from keras_reformer.local.local_attention import LocalAttention
from keras_reformer.lsh.lsh_attention import LSHAttention
from keras_reformer.layers.sinusoidal_position_embedding import (
    SinusoidalPositionEmbedding,
)
from keras_reformer.ops import buffers


def sample_next(sampler, logits, seed):
    """A keras-hub sampler's next tokens (B,) int32 for `logits` (B, V),
    drawn from the stateless `seed` (2,) instead of the sampler's own
    `SeedGenerator` (whose state a served graph must not advance)."""
    probabilities = sampler.compute_probabilities(logits)
    mapping = [(state, tf.cast(seed, state.dtype)) for state in sampler.variables]
    with keras.StatelessScope(state_mapping=mapping):
        token = sampler.get_next_token(probabilities)
    return tf.reshape(tf.cast(token, tf.int32), [-1])


class CachedDecoder:
    """Prompt pass, decode step and served sampling loop of one backbone.

    Args:
        backbone: a causal `ReformerBackbone` (`LSHAttention` and
            `LocalAttention` blocks).
        head: the layer mapping final hidden states to logits (the task's
            `lm_head`).
    """

    def __init__(self, backbone, head):
        self.backbone = backbone
        self.head = head
        self.stack = backbone.reversible_stack
        self.blocks = self.stack.blocks
        for index, (f, _) in enumerate(self.blocks):
            attention = getattr(f, "attention", None)
            kinds = (LSHAttention, LocalAttention)
            if getattr(attention, "reference_rules", False):
                raise ValueError(
                    "Cached decoding needs prefix-stable attention; block "
                    f"{index} ({f.name!r}) follows the reference's rules "
                    "(reference_rules=True), whose outputs depend on later "
                    "tokens. ReformerCausalLM.generate runs full passes instead."
                )
            if not isinstance(attention, kinds) or not getattr(f, "causal", False):
                raise ValueError(
                    "Cached decoding needs causal LSHAttention or LocalAttention "
                    "blocks; block "
                    f"{index} ({f.name!r}) is not one (causal="
                    f"{getattr(f, 'causal', None)})."
                )

    @property
    def stream_dtype(self):
        # ReversibleSequence keeps both streams in the variable dtype.
        return self.stack.variable_dtype

    def _positions(self, positions):
        """Position embeddings of `positions` (any shape): `shape + (hidden,)`."""
        embedding = self.backbone.token_embedding
        layer = self.backbone.position_embedding
        if layer is None:
            return tf.zeros(tf.concat([tf.shape(positions), [embedding.output_dim]], 0),
                            embedding.compute_dtype)
        if isinstance(layer, SinusoidalPositionEmbedding):
            return layer.embedding_at(positions, embedding.output_dim)
        return layer.embedding_at(positions)

    def rotations(self):
        """Each block's inference hash rotations, drawn once per decoding
        (None for a local attention block)."""
        rotations = []
        for index, (f, _) in enumerate(self.blocks):
            with self.stack.block_scope(index):
                rotations.append(f.attention.inference_rotations())
        return rotations

    def _hidden(self, y1, y2):
        """The two streams (B, L, H) -> final hidden states (B, L, 2H)."""
        h = tf.concat([tf.cast(y1, self.stack.compute_dtype),
                       tf.cast(y2, self.stack.compute_dtype)], axis=-1)
        return self.backbone.final_norm(h)

    def _logits(self, hidden):
        """Final hidden states (B, 1, 2H) -> logits (B, V) float32."""
        return tf.cast(self.head(hidden)[:, 0], tf.float32)

    # ----------------------------------------------------------- the passes

    def prompt_pass(self, token_ids, padding_mask, max_length):
        """Full causal pass over the prompts; fills the caches.

        Args:
            token_ids: (B, P) int32, right-padded prompts.
            padding_mask: (B, P) bool, True on the positions to cache (may
                be none at all in a row).
            max_length: int (an int32 scalar tensor outside XLA), the longest
                sequence the caches must hold.

        Returns:
            (logits (B, V) float32 after each row's last cached token,
             final hidden states (B, P, 2H),
             caches: a dict with "blocks" (one attention cache per block)
             and, with a short convolution, "history": its inputs at each
             row's last `width - 1` cached positions (B, width - 1, hidden),
             oldest first).
        """
        backbone = self.backbone
        prompt = tf.shape(token_ids)[1]
        x = backbone.token_embedding(token_ids)
        x = x + tf.cast(self._positions(tf.range(prompt))[None], x.dtype)
        last = tf.reduce_sum(tf.cast(padding_mask, tf.int32), axis=1) - 1
        caches = {}
        if backbone.short_convolution is not None:
            x = x * tf.cast(padding_mask, x.dtype)[..., None]
            caches["history"] = self._history(x, last)
            x = x + backbone.short_convolution(x)
        x1 = x2 = tf.cast(x, self.stream_dtype)
        blocks = []
        for index, (f, g) in enumerate(self.blocks):
            with self.stack.block_scope(index):
                blocks.append(f.init_cache(x2, padding_mask, max_length))
                x1 = x1 + tf.cast(f(x2, mask=padding_mask, training=False),
                                  self.stream_dtype)
                x2 = x2 + tf.cast(g(x1, training=False), self.stream_dtype)
        caches["blocks"] = blocks
        hidden = self._hidden(x1, x2)
        at = tf.maximum(last, 0)[:, None]
        logits = self._logits(tf.gather(hidden, at, axis=1, batch_dims=1))
        return logits, hidden, caches

    def _history(self, x, last):
        """x at positions last - width + 2 .. last of each row (zeros before 0)."""
        keep = self.backbone.short_convolution.width - 1
        # keep zero rows in front, so that position p is row p + keep.
        padded = tf.pad(x, [[0, 0], [keep, 0], [0, 0]])
        at = last[:, None] + 1 + tf.range(keep)[None, :]
        return tf.gather(padded, at, axis=1, batch_dims=1)

    def step(self, token, position, caches, rotations=None, in_place=False):
        """One token per row at its position -> (logits (B, V), hidden (B, 2H),
        new caches).

        Args:
            token: (B,) int32.
            position: (B,) int32, < the caches' max_length; every earlier
                position of the row is in the caches.
            caches: from `prompt_pass` or a previous step.
            rotations: `rotations()` (default: drawn again in this step).
            in_place: overwrite the caches (graph mode, owned caches; see
                `lsh.decoding.decode_step`).
        """
        backbone = self.backbone
        if rotations is None:
            rotations = self.rotations()
        x = backbone.token_embedding(token[:, None])
        x = x + tf.cast(self._positions(position)[:, None], x.dtype)
        new_caches = {}
        if backbone.short_convolution is not None:
            window = tf.concat([tf.cast(caches["history"], x.dtype), x], axis=1)
            x = x + backbone.short_convolution.last_position(window)[:, None]
            new_caches["history"] = window[:, 1:]
        x1 = x2 = tf.cast(x, self.stream_dtype)
        blocks = []
        for index, ((f, g), cache, rotation) in enumerate(
                zip(self.blocks, caches["blocks"], rotations)):
            with self.stack.block_scope(index):
                out, cache = f.call_with_cache(x2, cache, position, rotation, in_place)
                blocks.append(cache)
                x1 = x1 + tf.cast(out, self.stream_dtype)
                x2 = x2 + tf.cast(g(x1, training=False), self.stream_dtype)
        new_caches["blocks"] = blocks
        hidden = self._hidden(x1, x2)
        return self._logits(hidden), hidden[:, 0], new_caches

    # ----------------------------------------------------- the served loop

    def generate(self, token_ids, padding_mask, seed, *, max_length, sampler,
                 stop_token_ids, in_place=False):
        """The whole generation: prompt pass, then a `tf.while_loop` of steps.

        Each row continues after its own last real token (prompts are
        right-padded), until `max_length` tokens or a stop token. Meant to be
        traced inside one `tf.function`.

        Args:
            token_ids: (B, P) int32; padding_mask: (B, P) bool/int, P <= max_length.
            seed: (2,) int32, the sampling seed (the step is folded in).
            max_length: int, the total length of the output rows (an int32
                scalar tensor is allowed outside XLA).
            sampler: a keras-hub `Sampler` (drawn statelessly, see
                `sample_next`).
            stop_token_ids: tuple of ints (may be empty).
            in_place: update the caches and outputs in place: for TensorFlow
                graph mode, where each step would otherwise copy them whole
                (O(max_length) per token). Not under XLA (XLA updates loop
                buffers in place by itself, and has no in-place op).

        Returns:
            token_ids (B, max_length) int32 and padding_mask (B, max_length)
            bool: prompt, generated tokens (a stop token included), then
            padding (id 0) after a stop.
        """
        mask = tf.cast(padding_mask, tf.bool)
        token_ids = tf.where(mask, tf.cast(token_ids, tf.int32), 0)
        prompt = tf.shape(token_ids)[1]
        batch = tf.shape(token_ids)[0]
        logits, _, caches = self.prompt_pass(token_ids, mask, max_length)
        rotations = self.rotations()
        tail = [[0, 0], [0, max_length - prompt]]
        ids = tf.pad(token_ids, tail)
        out_mask = tf.pad(tf.cast(mask, tf.int32), tail)
        if in_place:
            # The loop overwrites these: give it buffers that nothing else holds.
            ids, out_mask, caches = buffers.own((ids, out_mask, caches))
        position = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
        done = position >= max_length
        rows = tf.range(batch)
        stops = tf.constant(list(stop_token_ids) or [-1], tf.int32)

        def emit(step, logits, position, done, ids, out_mask):
            """Sample each row's next token and write it at its position."""
            token = sample_next(
                sampler, logits, tf.random.experimental.stateless_fold_in(seed, step)
            )
            active = tf.logical_not(done)
            # Finished rows keep running in the batch, writing at a clamped
            # position that is never read again.
            at = tf.minimum(position, max_length - 1)
            # One element per row of the flat (B * max_length) outputs.
            flat = rows * max_length + at
            current = tf.gather(tf.reshape(ids, [-1]), flat)
            current_mask = tf.gather(tf.reshape(out_mask, [-1]), flat)
            ids = buffers.set_rows(
                ids, flat, tf.where(active, token, current), in_place, [current]
            )
            out_mask = buffers.set_rows(
                out_mask, flat, tf.where(active, 1, current_mask), in_place,
                [current_mask],
            )
            stopped = tf.reduce_any(token[:, None] == stops[None, :], axis=1)
            if not stop_token_ids:
                stopped = tf.zeros_like(stopped)
            done = done | (active & stopped) | (position + 1 >= max_length)
            position = position + tf.cast(active, tf.int32)
            return token, at, position, done, ids, out_mask

        # The first token comes from the prompt pass; each loop iteration
        # runs one cached step on the token before and samples the next, so
        # no step is spent on the last token.
        token, at, position, done, ids, out_mask = emit(
            0, logits, position, done, ids, out_mask
        )

        def cond(step, token, at, position, done, ids, out_mask, caches):
            return tf.reduce_any(tf.logical_not(done))

        def body(step, token, at, position, done, ids, out_mask, caches):
            logits, _, caches = self.step(token, at, caches, rotations, in_place)
            token, at, position, done, ids, out_mask = emit(
                step, logits, position, done, ids, out_mask
            )
            return step + 1, token, at, position, done, ids, out_mask, caches

        loop = tf.while_loop(
            cond, body, (tf.constant(1), token, at, position, done, ids, out_mask, caches),
            maximum_iterations=max_length,
        )
        ids, out_mask = loop[5], loop[6]
        return ids, tf.cast(out_mask, tf.bool)
