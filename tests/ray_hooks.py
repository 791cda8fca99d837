"""Loaded in every worker process of test_ray.py's Ray cluster (runtime_env worker_process_setup_hook).

A worker kills itself (SIGKILL) at a commit after its shard's first one, once, when the test has armed it: the
file named by FEATCACHE_TEST_KILL_FILE exists and this worker is the one that renames it away.
"""

import os
import signal


def install():
    from featcache.cache import write

    armed = os.environ["FEATCACHE_TEST_KILL_FILE"]
    original = write.CacheWriter.write

    def write_or_die(self, *args, **kwargs):
        if self.rows_done > 0:
            try:
                os.rename(armed, armed + ".fired")
            except FileNotFoundError:
                pass  # not armed, or another worker fired
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    write.CacheWriter.write = write_or_die
