"""tunelab/files.py: a JSON file written whole, by any number of threads at once."""

import json
import threading

from tunelab.files import write_json_atomic


def test_threads_writing_one_file_each_leave_a_whole_file_and_no_temporary(tmp_path):
    # With one temporary name per process, a second thread's rename would find the first thread's temporary gone.
    path = tmp_path / "run.json"
    errors = []

    def writer(n):
        try:
            for i in range(200):
                write_json_atomic(path, {"thread": n, "i": i, "pad": "x" * 2000})
        except Exception as e:  # noqa: BLE001 - the test reports whatever a writer raised
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    last = json.loads(path.read_text())
    assert last["i"] == 199 and last["thread"] in range(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
