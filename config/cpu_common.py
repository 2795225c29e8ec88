# CPU: shared by every config/*_cpu.py: one small backbone and one token budget on the TinyStories sample, so the
# families compare like for like on two otherwise idle CPU cores. Each *_cpu.py imports this, then sets its family.
# The data is the sample on its compact vocabulary (the ~6k GPT-2 ids its train split holds twice or more,
# prepare.py --vocab=compact): at this width a 50,257-way output would be most of every step. Prepare it once:
#   python prepare.py --input=corpus/tinystories --vocab=compact
dataset = 'tinystories_compact'  # python prepare.py --input=corpus/tinystories --vocab=compact

# backbone: 4 DiT blocks of width 128 over 64-token windows
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
rotary = True           # relative positions (rotary), as MDLM's and SEDD's DiT: a bidirectional model must attend to
                        # its neighbours to use context, which learned absolute positions make slow to learn (the
                        # mask family stayed at the unigram line for 750 iterations with them); ar overrides it
dropout = 0.0

# token budget: batch_size x block_size x max_iters = 8 x 64 x 4000 = 2.05M tokens (2.2 epochs of the sample's train
# split), the same for every *_cpu config, like for like (the sweeps' budget); the quick start (embed_cpu.py) trains
# fewer steps, the ones its ten minutes hold
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 4000
learning_rate = 1e-3    # a small model tolerates a high peak rate
warmup_iters = 50
weight_decay = 0.0      # as DiT: the diffusion models here are trained without weight decay
grad_clip = 1.0
ema_decay = 0.0         # a short run: the raw weights are the ones to look at

eval_interval = 250
eval_iters = 10         # 10 x 8 windows of 64 tokens per split: ~5k tokens, a third of the val split
log_interval = 10

device = 'cpu'
dtype = 'float32'       # bf16 autocast runs on CPU too, but was no faster here (the step is memory bound)
compile = False
