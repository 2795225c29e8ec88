"""Tests of system.py: the 'auto' device and dtype, and the settings no device takes; MFU's FLOPs count; the
fingerprint that compares DDP ranks; a stop at the next step boundary on SIGINT / SIGTERM, and the command that
resumes it; a script's end in one line at Ctrl-C. (DDP's process group and its checks run in test_train.py's
torchrun tests.)"""
import os
import signal

import pytest
import torch

from model import ModelConfig, build_model
from system import (GracefulStop, StopNow, estimate_mfu, fingerprint, flops_per_token, resolve_device,
                    resume_command, run_script)


def test_the_auto_settings_resolve_and_the_impossible_ones_are_one_line():
    device, device_type, dtype = resolve_device('cpu', 'auto')
    assert (device, device_type, dtype) == ('cpu', 'cpu', 'float32')  # bf16 on request only: no faster on CPUs
    for device, dtype, words in (('tpu', 'auto', "device='tpu', expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
                                 ('cpu', 'fp8', "dtype='fp8', expected 'auto', 'float32', 'bfloat16' or 'float16'"),
                                 ('cpu', 'float16', "dtype='float16' needs CUDA (loss scaling)"),
                                 *([('mps', 'auto', "device='mps' but torch.backends.mps.is_available() is False")]
                                   if not torch.backends.mps.is_available() else [])):
        with pytest.raises(SystemExit) as e:
            resolve_device(device, dtype, prog='sample.py')
        assert str(e.value.code).startswith(f"sample.py: {words}"), e.value.code


def test_flops_count_the_conditioning_path_once_per_sequence():
    """6N per token for the matmuls plus 12 L d T for attention; the time MLP and the adaLN modulations run once per
    sequence, so they count 1/block_size of theirs."""
    for model_type in ('ar', 'embed'):
        m = build_model(ModelConfig(model_type=model_type, vocab_size=64, block_size=16, n_layer=2, n_head=2,
                                    n_embd=32))
        per_seq = sum(p.numel() for n, p in m.named_parameters() if 't_embedder' in n or 'modulation' in n)
        assert per_seq >= (2 * 6 + 2) * 32  # every block's six vectors and the final two, at least
        want = 6 * (m.get_num_params() - per_seq) + 6 * per_seq / 16 + 12 * 2 * 32 * 16
        assert flops_per_token(m) == pytest.approx(want, rel=1e-12)
        assert estimate_mfu(m, 8, 0.5, 1e12) == pytest.approx(want * 8 * 16 / 0.5 / 1e12, rel=1e-12)


def test_fingerprints_are_equal_exactly_when_the_bytes_are():
    a = [torch.arange(6.0), torch.ones(2, 2)]
    assert fingerprint(a) == fingerprint([t.clone() for t in a])
    b = [torch.arange(6.0), torch.ones(2, 2)]
    b[1][0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp
    assert fingerprint(a) != fingerprint(b)


def test_a_signal_is_recorded_and_a_second_one_stops_at_once():
    with GracefulStop() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and GracefulStop.name(stop.signum) == 'SIGTERM'
        with pytest.raises(StopNow) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_the_resume_command_is_the_run_as_it_was_launched():
    argv = ['config/embed_cpu.py', '--init_from=scratch', '--out_dir=my out']
    assert resume_command(argv, 1) == "python train.py config/embed_cpu.py '--out_dir=my out' --init_from=resume"
    assert resume_command(argv, 2).startswith('torchrun --standalone --nproc_per_node=2 train.py config/embed_cpu.py')


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130(capsys):
    """Ctrl-C in sample.py, evaluate.py, bench.py ... (and in train.py before its loop): no KeyboardInterrupt
    traceback; their outputs are renamed into place whole, so nothing is half-written."""
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_script(main, 'evaluate.py')
    assert e.value.code == 130 and capsys.readouterr().err == 'evaluate.py: interrupted\n'
