# The recipe of pdllm's embedded toy model: the stages that build it, each one run of
# pdllm.train_toy initialised from the weights of the stage before (a fresh optimizer).
#
#     python -m pdllm.train_toy --recipe src/pdllm/assets/toy/recipe.py --out runs/toy --device cuda
#     python -m pdllm.train_toy --recipe src/pdllm/assets/toy/recipe.py --out runs/toy --device cuda \
#         --from-stage long_bos --init-from DIR     # the last stage alone, from stage 4's output
#
# Each stage is a dict of TrainConfig fields (see pdllm/train_toy.py) plus its name and what it
# is for. `stop_at` ends a stage where the run that built the shipped model ended (those runs
# were cut by a time limit); the learning-rate schedule stays that of `steps`.

# Every stage says these; the trainer's defaults are not part of the recipe.
BASE = dict(
    d_model=256, n_heads=4, mlp_hidden=768, rope_theta=10000.0, embedding_std=1.0,
    answer_length=16, chunk_size=64, tokens_per_batch=65536, min_context=64,
    curriculum_frac=0.5, long_frac=0.5, needle_spacing=48, min_needles=1,
    pretrain_frac=0.0, passage_frac=0.0, full_mask_frac=0.0,
    lr=1e-3, min_lr_ratio=0.1, warmup=200, weight_decay=0.1, grad_clip=1.0, seed=0,
    eval_n=100, max_train_minutes=30.0,
)
# Key selection first: on short contexts packed with 2+ needles, copying the only number in
# sight never answers, so the model has to read the question's key.
KEYS = dict(tasks="multikey_needle,kv_lookup", min_needles=2, needle_spacing=20, max_context=256)

STAGES = [
    dict(BASE, name="keys", what="key selection, short contexts, from scratch (4 layers)",
         n_layers=4, **KEYS, steps=5500),
    dict(BASE, name="long", what="all tasks, contexts to 1024 tokens",
         n_layers=4, max_context=1024, steps=2200, stop_at=1585),
    # With t ~ U(0, 1) most rows show some digits of the answer and the model learnt to continue
    # them instead of finding the needle by its key; rows with the whole answer masked train the
    # step decoding from a fully masked answer needs.
    dict(BASE, name="keys_full_mask", what="as `keys`, half the rows with the whole answer masked",
         n_layers=4, **KEYS, full_mask_frac=0.5, lr=5e-4, steps=4500, stop_at=3293),
    dict(BASE, name="long_full_mask", what="as `long`, half the rows with the whole answer masked",
         n_layers=4, max_context=1024, full_mask_frac=0.5, lr=5e-4, steps=2400, stop_at=1474, eval_n=30),
    # Grown to 8 layers (each layer followed by a copy of itself that adds nothing until trained:
    # train_toy.grow_layers), trained at 2048 tokens, with packed BOS-led documents (pretraining
    # rows) and contexts cut into BOS-led passages, so that a BOS inside a sequence is in
    # distribution as it is for a model pretrained on packed corpora.
    dict(BASE, name="long_bos", what="grown to 8 layers; contexts to 2048 tokens; packed BOS-led documents "
         "(15% of rows) and BOS-led passages (30% of SFT rows)",
         n_layers=8, chunk_size=128, max_context=2048, curriculum_frac=0.3, full_mask_frac=0.5,
         pretrain_frac=0.15, passage_frac=0.3, passage_min=32, passage_max=256, lr=5e-4, warmup=100,
         steps=900, max_train_minutes=4.0, eval_lengths=(1024, 2048), eval_n=30),
]
