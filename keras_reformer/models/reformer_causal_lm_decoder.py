"""Cached decoding of a causal ReformerModel: prompt pass, one-token steps,
and the compiled sampling loop behind `ReformerCausalLM.generate()`.

At inference a reversible block is just `y1 = x1 + f(x2)`, `y2 = x2 +
g(y1)`, and everything but attention acts on each position alone. So a
decode step runs the backbone's own layers on one token per row: the
embedding, the position table at that row's position, then per block the
attention block's LayerNorm and a cached LSH attention
(`ops.lsh_decode`) through the same `LSHAttention`'s projections, hash
rotations and output projection, then the feed-forward block itself, and at
the end the final LayerNorm and vocabulary projection.

The backbone's layers are found by name (public `Model.get_layer`):
`token_embedding`, `position_embedding` (if any), `short_convolution` (if
any: its last `width - 1` inputs per row ride along as the last element of
the caches), `reversible_stack` (its
`blocks`, in order), `final_norm`, `logits` (if the backbone has its head).
"""

import tensorflow as tf

from keras_reformer.layers.lsh_attention import LSHAttention
from keras_reformer.ops import lsh, lsh_decode


def _layer(model, name, required=True):
    try:
        return model.get_layer(name)
    except ValueError:
        if required:
            raise ValueError(
                f"Cached decoding needs the backbone layer {name!r} of a "
                "ReformerModel; this backbone has none. Layers: "
                f"{[layer.name for layer in model.layers]}"
            ) from None
        return None


class CachedDecoder:
    """Prompt pass, decode step and sampling loop of one causal backbone.

    Args:
        backbone: a causal `ReformerModel`.
        head: the layer mapping final hidden states to logits: the
            backbone's `logits` layer, or the task's own head when the
            backbone was built with `include_head=False`.
    """

    def __init__(self, backbone, head):
        self.backbone = backbone
        self.head = head
        self.embedding = _layer(backbone, "token_embedding")
        self.position = _layer(backbone, "position_embedding", required=False)
        self.convolution = _layer(backbone, "short_convolution", required=False)
        self.stack = _layer(backbone, "reversible_stack")
        self.final_norm = _layer(backbone, "final_norm")
        self.blocks = self.stack.blocks
        for index, (f, _) in enumerate(self.blocks):
            attention = getattr(f, "attention", None)
            if not isinstance(attention, LSHAttention) or not getattr(f, "causal", False):
                raise ValueError(
                    "Cached decoding needs causal LSHAttention blocks; block "
                    f"{index} ({f.name!r}) is not one (causal="
                    f"{getattr(f, 'causal', None)})."
                )

    # ------------------------------------------------------------- helpers

    @property
    def stream_dtype(self):
        # ReversibleSequence keeps both streams in the variable dtype.
        return self.stack.variable_dtype

    def position_table(self, max_length):
        """(max_length, hidden) position embeddings (zeros if there are none)."""
        hidden = self.embedding.output_dim
        zeros = tf.zeros([1, max_length, hidden], self.embedding.compute_dtype)
        if self.position is None:
            return zeros[0]
        return self.position(zeros)[0]

    def _reach(self, attention):
        return attention.num_chunks_before * attention.bucket_size

    def rotations(self):
        """Each block's inference hash rotations (a list of tensors per block).

        Computed once before the decode loop: they are the same at every
        step, and drawing them costs O(num_buckets) per layer.
        """
        rotations = []
        for index, (f, _) in enumerate(self.blocks):
            with self.stack.block_scope(index):
                rotations.append(f.attention._rotations(
                    f.attention._factors(), f.attention.num_hashes, False))
        return rotations

    def _logits(self, y1, y2):
        """Stream outputs at one position per row (B, 1, H) -> (B, V) float32."""
        h = tf.concat([tf.cast(y1, self.stack.compute_dtype),
                       tf.cast(y2, self.stack.compute_dtype)], axis=-1)
        return tf.cast(self.head(self.final_norm(h))[:, 0], tf.float32)

    # ----------------------------------------------------------- the passes

    def prompt_pass(self, token_ids, padding_mask, max_length):
        """Full causal pass over the prompts; fills one cache per block.

        Args:
            token_ids: (B, P) int32, right-padded prompts.
            padding_mask: (B, P) bool, True on real tokens (each row >= 1).
            max_length: int (an int32 scalar tensor outside XLA), the longest
                sequence the caches must hold.

        Returns:
            (logits (B, V) float32 after each row's last real token,
             caches: a list with one `lsh_decode` cache per block, then,
             with a short convolution, its inputs at each row's last
             `width - 1` positions (B, width - 1, hidden), oldest first).
        """
        prompt = tf.shape(token_ids)[1]
        x = self.embedding(token_ids)
        x = x + tf.cast(self.position_table(max_length)[None, :prompt], x.dtype)
        last = tf.reduce_sum(tf.cast(padding_mask, tf.int32), axis=1) - 1
        history = None
        if self.convolution is not None:
            x = x * tf.cast(padding_mask, x.dtype)[..., None]
            history = self._history(x, last)
            x = x + self.convolution(x)
        x1 = x2 = tf.cast(x, self.stream_dtype)
        caches = []
        for index, (f, g) in enumerate(self.blocks):
            # Block index's weights (the stack's slices with stack_weights).
            with self.stack.block_scope(index):
                attention = f.attention
                qk, v = attention.project(f.norm(x2))
                buckets, total = attention.hash_buckets(qk)
                if attention.value_shift:
                    v = lsh.shifted_values(v, padding_mask)
                caches.append(lsh_decode.init_cache(
                    qk, v, buckets, padding_mask, total, self._reach(attention),
                    max_length,
                ))
                x1 = x1 + tf.cast(f(x2, mask=padding_mask, training=False),
                                  self.stream_dtype)
                x2 = x2 + tf.cast(g(x1, training=False), self.stream_dtype)
        pick = lambda y: tf.gather(y, last[:, None], axis=1, batch_dims=1)  # noqa: E731
        if history is not None:
            caches.append(history)
        return self._logits(pick(x1), pick(x2)), caches

    def _history(self, x, last):
        """x at positions last - width + 2 .. last of each row (zeros before 0)."""
        keep = self.convolution.width - 1
        # keep zero rows in front, so that position p is row p + keep.
        padded = tf.pad(x, [[0, 0], [keep, 0], [0, 0]])
        at = last[:, None] + 1 + tf.range(keep)[None, :]
        return tf.gather(padded, at, axis=1, batch_dims=1)

    def step(self, token, position, caches, table, rotations=None, in_place=False):
        """One token per row at its position -> (logits (B, V), new caches).

        Args:
            token: (B,) int32.
            position: (B,) int32, < the caches' max_length.
            caches: from `prompt_pass` or a previous step.
            table: `position_table(max_length)`.
            rotations: `rotations()` (default: drawn again in this step).
            in_place: overwrite the caches (graph mode, owned caches; see
                `lsh_decode.decode_step`).
        """
        if rotations is None:
            rotations = self.rotations()
        x = self.embedding(token[:, None])
        x = x + tf.cast(tf.gather(table, position)[:, None], x.dtype)
        new_caches = []
        if self.convolution is not None:
            window = tf.concat([tf.cast(caches[-1], x.dtype), x], axis=1)
            x = x + self.convolution.last_position(window)[:, None]
            caches = caches[:-1]
            history = window[:, 1:]
        x1 = x2 = tf.cast(x, self.stream_dtype)
        for index, ((f, g), cache, rotation) in enumerate(
                zip(self.blocks, caches, rotations)):
            with self.stack.block_scope(index):
                attention = f.attention
                normed = f.norm(x2)
                qk, v = attention.project(normed)
                buckets = lsh.hash_vectors(qk, rotation)
                out, cache = lsh_decode.decode_step(
                    cache, qk[:, :, 0], v[:, :, 0], buckets[..., 0], position,
                    self._reach(attention), attention.sliding_window,
                    in_place=in_place, value_shift=attention.value_shift,
                )
                new_caches.append(cache)
                gate = attention.gate_dense(normed) if attention.use_gate else None
                attended = attention.attend_output(out[:, :, None], gate)
                # The block's own dropout is the identity at inference.
                x1 = x1 + tf.cast(attended, self.stream_dtype)
                x2 = x2 + tf.cast(g(x1, training=False), self.stream_dtype)
        if self.convolution is not None:
            new_caches.append(history)
        return self._logits(x1, x2), new_caches

    # ------------------------------------------------------------- the loop

    def generate(self, token_ids, padding_mask, seed, *, max_length, sampler,
                 stop_token_ids, in_place=False):
        """The whole generation: prompt pass, then a `tf.while_loop` of steps.

        Each row continues after its own last real token (prompts are
        right-padded), until `max_length` tokens or a stop token. Meant to be
        traced inside one `tf.function`.

        Args:
            token_ids: (B, P) int32; padding_mask: (B, P) bool/int, P <= max_length.
            seed: (2,) int32, the sampler's stateless seed (step folded in).
            max_length: int, the total length of the output rows (an int32
                scalar tensor is allowed outside XLA).
            sampler: a `Sampler`.
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
        logits, caches = self.prompt_pass(token_ids, mask, max_length)
        table = self.position_table(max_length)
        rotations = self.rotations()
        tail = [[0, 0], [0, max_length - prompt]]
        ids = tf.pad(token_ids, tail)
        out_mask = tf.pad(tf.cast(mask, tf.int32), tail)
        if in_place:
            # The loop overwrites these: give it buffers that nothing else holds.
            ids, out_mask, caches = lsh_decode.own((ids, out_mask, caches))
        position = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
        done = position >= max_length
        rows = tf.range(batch)
        stops = tf.constant(list(stop_token_ids) or [-1], tf.int32)

        def emit(step, logits, position, done, ids, out_mask):
            """Sample each row's next token and write it at its position."""
            token = sampler(logits, tf.random.experimental.stateless_fold_in(seed, step))
            active = tf.logical_not(done)
            # Finished rows keep running in the batch, writing at a clamped
            # position that is never read again.
            at = tf.minimum(position, max_length - 1)
            # One element per row of the flat (B * max_length) outputs.
            flat = rows * max_length + at
            current = tf.gather(tf.reshape(ids, [-1]), flat)
            current_mask = tf.gather(tf.reshape(out_mask, [-1]), flat)
            ids = lsh_decode.set_rows(
                ids, flat, tf.where(active, token, current), in_place, [current]
            )
            out_mask = lsh_decode.set_rows(
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
        # no step is spent on the last token (and no `tf.cond` is needed to
        # skip it: under XLA a conditional around the step made it copy the
        # caches at every step).
        token, at, position, done, ids, out_mask = emit(
            0, logits, position, done, ids, out_mask
        )

        def cond(step, token, at, position, done, ids, out_mask, caches):
            return tf.reduce_any(tf.logical_not(done))

        def body(step, token, at, position, done, ids, out_mask, caches):
            logits, caches = self.step(token, at, caches, table, rotations, in_place)
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
