# CPU: the compact vocabulary against GPT-2's, at equal tokens: ar (exact likelihood) trained 1,000 steps of 8 x 64
# tokens on each, scored per GPT-2 token on the same test text; and ar at the quick start's budget, its baseline.
#   python prepare.py --input=corpus/tinystories --vocab=compact && python prepare.py --input=corpus/tinystories
#   python train.py config/ar_cpu.py                                        # 4,000 steps, compact: out-ar-cpu
#   python train.py config/ar_cpu.py --max_iters=1000 --out_dir=out-ar-cmp-compact
#   python train.py config/ar_cpu.py --max_iters=1000 --dataset=tinystories --out_dir=out-ar-cmp-gpt2
#   python evaluate.py config/eval_compact.py
ckpts = ['out-ar-cpu', 'out-ar-cmp-compact', 'out-ar-cmp-gpt2']
judge = ''                # the vocabularies differ: no shared ar judge (gen-PPL is config/eval_quickstart.py's)
out_dir = 'results/compact-vs-gpt2'
steps = [64]
num_samples = 4
sample_length = 64
max_windows = 0           # the whole test split
device = 'cpu'
