# GPU: shared by the GPU configs (dit_tinystories.py for embed, <family>_gpu.py for the others): one DiT-B-sized
# backbone (12 x 768) and one token budget on all of TinyStories (python prepare.py), so the families compare like
# for like.
# Each imports this, then sets its family. For a single GPU:  python train.py config/dit_tinystories.py
# For 8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/dit_tinystories.py
dataset = 'tinystories'

# backbone: DiT-B (12 blocks, width 768, 12 heads) over 256-token windows (a TinyStories story is ~200 tokens)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 256
rotary = True           # relative positions for the bidirectional families (as MDLM's DiT); ar overrides it
dropout = 0.0

# token budget: 64 x 8 x 256 = 131k tokens per step, 50k steps = 6.6B tokens
batch_size = 64
gradient_accumulation_steps = 8  # over all ranks: 8 GPUs run one micro-batch each
max_iters = 50000
learning_rate = 3e-4
warmup_iters = 2000
weight_decay = 0.0      # as DiT
grad_clip = 1.0
ema_decay = 0.9999      # as DiT: samples and the checkpoint's val score use the EMA weights

eval_interval = 1000
eval_iters = 50
log_interval = 50

device = 'auto'
dtype = 'auto'          # bf16 autocast on GPUs that have it, else fp16 with loss scaling
compile = True
