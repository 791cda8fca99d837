"""Process setup of a CLI run, before TensorFlow is imported: deterministic ops, a quick exit, SIGTERM met as
Ctrl-C, and a stderr without TensorFlow's log lines (a filter process between the native stderr and the
terminal)."""

from __future__ import annotations

import atexit
import gc
import io
import logging
import os
import re
import signal
import sys
import time
import warnings

# TensorFlow's C++ log lines (absl/TSL) but its fatal ones (F...), the one absl prints before it is set up,
# and libjpeg's own messages about a broken JPEG (extract.py lists every file it skips, with the reason; predict.py
# says why it cannot read a file), the families of libjpeg-turbo's jerror.h that a damaged file brings out.
NATIVE_LOG_LINE = re.compile(rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                             rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                             rb"|Improper call to JPEG library in state \d+$|Corrupt JPEG data: "
                             rb"|Premature end of JPEG file$|Invalid JPEG file structure: |Not a JPEG file: "
                             rb"|Input file read error$|Bogus [\w ]+$|Unsupported (?:marker type|JPEG data precision) "
                             rb"|Invalid (?:component ID \d+ in SOS|SOS parameters for sequential JPEG)$"
                             rb"|(?:Huffman|Quantization) table 0x[\da-f]{2} was not defined$"
                             rb"|Warning: unknown JFIF revision number "
                             rb"|fully_quantize: \d+, inference_type: |INFO: Created TensorFlow Lite XNNPACK delegate)")


def setup_process(verbose: bool):
    """Process-wide settings of a CLI run, made before TensorFlow is imported. Unless `verbose`, no TensorFlow log
    line (CUDA probes, oneDNN's notice; logged through absl, which TF_CPP_MIN_LOG_LEVEL does not silence) reaches
    the terminal: stderr's file descriptor goes through a filter that drops exactly such lines; Python's own stderr
    (errors, progress bars, tracebacks) is written past the filter, unchanged."""
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")  # same seed, same head, on a GPU too
    # Exit without a last cyclic collection over the objects TensorFlow's import leaves (slow); only finalizers of
    # cyclic garbage alive at exit are skipped, which Python never promises to run.
    atexit.register(gc.freeze)
    # SIGTERM (a scheduler's or `kill`'s stop) is met as Ctrl-C is: committed rows stay, Ray workers and OpenVINO
    # requests are stopped by the same cleanup, and the process ends with a line instead of vanishing.
    signal.signal(signal.SIGTERM, _interrupt)
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The converters' Python-side chatter (deprecation notices, absl warnings about arguments we cannot pass).
    for name in ("absl", "tensorflow", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\.lite\.python\.")
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    filter_pid = os.fork()
    if filter_pid == 0:  # the filter: a process of its own, so it passes on even what a crashing process wrote last
        _filter_native_lines(read_end, write_end, terminal)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w", closefd=False), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)

    def drain():
        """At exit, fd 2 back to the terminal closes the pipe's write end, so the filter passes on the rest and exits
        (waited for 2 s at most: a child process may hold a copy of the write end)."""
        sys.stderr.flush()
        os.dup2(terminal, 2)
        deadline = time.monotonic() + 2
        while os.waitpid(filter_pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.005)

    atexit.register(drain)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _filter_native_lines(read_end: int, write_end: int, terminal: int):
    """The filter process: every line from the pipe but the native log lines, to the terminal; exits at the
    pipe's end (once every process that writes to it has closed it, or died)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the process it serves
        os.close(write_end)
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            passed = b"".join(line + b"\n" for line in lines if not NATIVE_LOG_LINE.match(line + b"\n"))
            if passed:
                os.write(terminal, passed)
        if pending and not NATIVE_LOG_LINE.match(pending):
            os.write(terminal, pending)
    finally:
        os._exit(0)
