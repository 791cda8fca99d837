"""Normal runs print no TensorFlow log lines; --verbose shows them; nothing else on stderr is lost."""

import re
import importlib.util
import subprocess
import sys

import numpy as np

from conftest import ROOT, run_cli

NOISE = re.compile(r"cuda|absl|NodeDef|oneDNN|E0000|I0000|W0000")


def _clean(out):
    assert out.returncode == 0, out.stderr
    noisy = [line for line in out.stderr.splitlines() if NOISE.search(line)]
    assert not noisy, noisy


def test_every_cli_run_as_a_user_would_prints_no_tensorflow_log_line(tiny_model, cifar_root, tmp_path):
    import tensorflow as tf

    common = ["--model", tiny_model, "--image-size", "32", "--cache-dir", tmp_path / "cache"]
    _clean(run_cli("extract.py", "--data-dir", cifar_root, *common, "--views", "plain", "--engine", "tensorflow",
                   in_process=False))
    _clean(run_cli("train_head.py", *common, "--epochs", "1", "--runs-dir", tmp_path / "runs", in_process=False))
    image = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image.write_bytes(tf.io.encode_png(pixels).numpy())
    predicted = run_cli("predict.py", image, "--runs-dir", tmp_path / "runs", in_process=False)
    _clean(predicted)
    assert predicted.stdout.startswith(f"{image}: ")
    _clean(run_cli("export.py", tmp_path / "exported", "--runs-dir", tmp_path / "runs", in_process=False))
    if importlib.util.find_spec("ai_edge_litert") is None:
        return  # the LiteRT part needs requirements-deploy.txt
    # The converter's and the interpreter's own chatter (deprecations, absl warnings, statistics, delegates) too:
    # nothing on stderr but the line naming what is used.
    exported = run_cli("export.py", tmp_path / "m", "--format", "tflite", "--quantize", "int8", "--runs-dir",
                       tmp_path / "runs", in_process=False)
    assert exported.returncode == 0 and [line.split(" ")[0] for line in exported.stderr.splitlines()] == [
        "using", "loading", "reading", "correcting", "converting"], exported.stderr
    quiet = run_cli("export.py", tmp_path / "q", "--format", "onnx", "--quiet", "--runs-dir", tmp_path / "runs",
                    in_process=False)
    assert quiet.returncode == 0 and [line.split(" ")[:2] for line in quiet.stderr.splitlines()] == [
        ["using", "run"]], quiet.stderr
    image.write_bytes(tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy())  # the size the file takes
    predicted = run_cli("predict.py", "--model", tmp_path / "m.tflite", image, in_process=False)
    assert predicted.returncode == 0 and predicted.stderr.splitlines() == [f"using tflite export {tmp_path / 'm.tflite'}"]


FILTER_PROBE = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.process import setup_process
setup_process(verbose=sys.argv[1] == "verbose")
os.write(2, b"I0000 00:00:1795851638.782067   29279 cudart_stub.cc:31] Could not find cuda drivers\\n")
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
os.write(2, b"E0000 00:00:1795851643.734243   29279 node_def_util.cc:682] NodeDef mentions attribute\\n")
os.write(2, b"Improper call to JPEG library in state 201\\n")
os.write(2, b"a native line that is not a log line\\n")
print("python stderr line", file=sys.stderr)
"""


FATAL_PROBE = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.process import setup_process
setup_process(verbose=False)
os.write(2, b"I0000 00:00:1795851638.782067   29279 cudart_stub.cc:31] Could not find cuda drivers\\n")
os.write(2, b"F0000 00:00:1795851640.000001   29279 tensor.cc:1] Check failed: dims() == 2\\n")
os.abort()  # as TensorFlow does after a fatal line
"""


def test_a_fatal_native_line_reaches_the_terminal_even_as_the_process_dies():
    died = subprocess.run([sys.executable, "-c", FATAL_PROBE], capture_output=True, text=True, timeout=60)
    assert died.returncode == -6  # SIGABRT
    assert died.stderr == "F0000 00:00:1795851640.000001   29279 tensor.cc:1] Check failed: dims() == 2\n"


def test_the_filter_drops_only_log_lines_and_verbose_keeps_them():
    quiet = subprocess.run([sys.executable, "-c", FILTER_PROBE, "quiet"], capture_output=True, text=True)
    # (the two streams are not ordered against each other: Python's bypasses the filter)
    assert sorted(quiet.stderr.splitlines()) == ["a native line that is not a log line", "python stderr line"]
    verbose = subprocess.run([sys.executable, "-c", FILTER_PROBE, "verbose"], capture_output=True, text=True)
    assert len(verbose.stderr.splitlines()) == 6 and "cudart_stub" in verbose.stderr


BROKEN_JPEG_PROBE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from featcache.process import setup_process
setup_process(verbose=False)
import numpy as np, tensorflow as tf
from featcache.extract.sources.encoded import decode_bytes
whole = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).numpy()
for data in (whole[:len(whole) // 2], whole[:200], b"\\xff\\xd8\\xff\\xe0" + b"garbage" * 20,
             whole[:2] + b"\\xff\\xc4\\x00\\x05\\x10\\x00\\x00" + whole[2:]):
    print(decode_bytes(data)[1].split(":")[0], file=sys.stderr)
"""


def test_libjpegs_own_lines_about_a_broken_jpeg_are_dropped():
    """predict.py's one line per unreadable file, nothing of libjpeg's ("Input file read error", "Bogus ...")."""
    out = subprocess.run([sys.executable, "-c", BROKEN_JPEG_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr.splitlines() == ["not a decodable image"] * 4, out.stderr


EXIT_PROBE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
if sys.argv[1] == "cli":
    from featcache.process import setup_process
    setup_process(verbose=True)

class Cycle:
    def __del__(self):
        sys.stdout.write("collected at exit\\n")

kept = Cycle()
kept.me = kept
"""


def test_a_cli_process_exits_without_a_last_collection():
    """setup_process freezes the heap at exit: a CLI skips the cyclic collection over TensorFlow's objects
    (measured 1.4 s); a plain interpreter still collects this cycle when it finalises."""
    plain = subprocess.run([sys.executable, "-c", EXIT_PROBE, "plain"], capture_output=True, text=True)
    cli = subprocess.run([sys.executable, "-c", EXIT_PROBE, "cli"], capture_output=True, text=True)
    assert plain.returncode == cli.returncode == 0, (plain.stderr, cli.stderr)
    assert plain.stdout == "collected at exit\n"
    assert cli.stdout == ""
