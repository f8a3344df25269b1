"""Train a small character-level GPT with the Python API, alone or on N ranks, then generate text.

    python examples/train_gpt.py                 # on a short verse made here
    python examples/train_gpt.py shakespeare.txt # on a text file of yours (UTF-8)
    mpirun -n 2 python examples/train_gpt.py

The model is nanoGPT's, smaller: token and position embeddings, 2 blocks of x + attention(LayerNorm(x))
and x + MLP(LayerNorm(x)) with causal 4-head attention, a final LayerNorm and a Dense over the last axis
to the characters. The run is measured in steps (an epoch of a text is every window of it), evaluates
every 50 steps on a fixed subset of the validation windows, and decays the weight matrices only.
"""

import sys

import numpy as np

from dptrain import (
    GELU,
    AdamW,
    Dense,
    Embedding,
    LayerNorm,
    MultiHeadSelfAttention,
    PositionEmbedding,
    Residual,
    Sequential,
    SoftmaxCrossEntropy,
    Trainer,
    generate,
    make_comm,
)
from dptrain.data import evaluation_rows, load_text, text_dataset

BLOCK, WIDTH = 32, 32

comm = make_comm()
if len(sys.argv) > 1:
    data = load_text(sys.argv[1], block_size=BLOCK, val_fraction=0.1)
else:
    verse = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    data = text_dataset(verse * 40, block_size=BLOCK, val_fraction=0.1)
train_rows, val_rows = data.split  # the text's first 90% trains, the rest validates
train = data.subset(train_rows).astype(np.float32)  # ids as float32: exact, the Embedding checks them
val = data.subset(val_rows).subset(evaluation_rows(len(val_rows), 96, seed=0)).astype(np.float32)


def block():
    attention = Residual([LayerNorm(over="last"), MultiHeadSelfAttention(heads=4, causal=True)])
    mlp = Residual([LayerNorm(over="last"), Dense(4 * WIDTH, init="xavier"), GELU(), Dense(WIDTH, init="xavier")])
    return [attention, mlp]


model = Sequential([Embedding(WIDTH, vocab=data.n_classes), PositionEmbedding(), *block(), *block(),
                    LayerNorm(over="last"), Dense(data.n_classes, init="xavier")], in_shape=BLOCK)
model.init_params(np.random.default_rng(0))
optimizer = AdamW(model.param_buffer, model.grad_buffer, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
optimizer.decay_only(model.decay_ranges())  # the weight matrices, not biases, norms or embeddings
trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train, val, batch_size=32, steps=150,
                  eval_every_steps=50, comm=comm, out_dir="runs/api-gpt", log=None)
history = trainer.fit()  # one metrics dict per evaluation, the same on every rank
if comm.rank == 0:
    print(f"val_loss {history[0]['val_loss']:.4f} -> {history[-1]['val_loss']:.4f}")
    print(generate(model, data.vocab, "Thou ", tokens=60, temperature=0.8, seed=1))
