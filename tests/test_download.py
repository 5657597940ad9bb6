"""First run online, against a server on 127.0.0.1 that serves the original MNIST files from
../shared/data: a good server, one that serves a corrupt file, one that drops the connection
half-way (always, or once)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from advsweep.bench import cli
from advsweep.models import datasets, download
from tests.conftest import DATA_DIR, requires_data

pytestmark = requires_data


class _Server:
  """Serves `<root>/mnist/<file>` from the raw MNIST folder, in a mode the test sets."""

  def __init__(self, raw: Path):
    self.mode, self.requests, self.raw = "good", [], raw
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802  (the stdlib's name)
        server.requests.append(self.path)
        path = server.raw / Path(self.path).name
        if not self.path.startswith("/mnist/") or not path.is_file():
          self.send_error(404)
          return
        data = path.read_bytes()
        if server.mode == "corrupt":
          data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if server.mode == "drop" or (server.mode == "drop_once" and len(server.requests) == 1):
          self.wfile.write(data[:len(data) // 2])
          self.close_connection = True
          return
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
  s = _Server(DATA_DIR / "mnist-raw")
  monkeypatch.setenv(download.MIRRORS_ENV, s.url)
  monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(download.DOWNLOAD_ENV, "1")
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  yield s
  s.close()


def _cache_files(tmp_path: Path) -> list[str]:
  return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_a_first_run_downloads_verifies_and_then_reads_the_cache(server, tmp_path):
  images, labels = datasets.load("mnist", "test")
  reference = datasets.load("mnist", "test", DATA_DIR)
  np.testing.assert_array_equal(images, reference[0])
  np.testing.assert_array_equal(labels, reference[1])
  assert _cache_files(tmp_path) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
  assert len(server.requests) == 2
  datasets.load("mnist", "test")
  assert len(server.requests) == 2  # the second load reads the cache


def test_a_corrupt_file_is_refused_and_nothing_is_cached(server, tmp_path):
  server.mode = "corrupt"
  with pytest.raises(datasets.DatasetNotFoundError, match="checksum mismatch") as err:
    datasets.load("mnist", "test")
  message = str(err.value)
  assert server.url + "mnist/t10k-images-idx3-ubyte.gz" in message
  assert str(tmp_path / "cache" / "mnist-raw" / "t10k-images-idx3-ubyte.gz") in message
  assert len(server.requests) == 1  # a wrong file is not asked for again
  assert _cache_files(tmp_path) == []


def test_a_dropped_connection_is_retried_then_refused_cleanly(server, tmp_path):
  server.mode = "drop_once"
  assert datasets.load("mnist", "test")[0].shape == (10000, 28, 28, 1)
  assert len(server.requests) == 3  # the dropped one, its retry, the labels
  for cached in (tmp_path / "cache").rglob("*.gz"):
    cached.unlink()
  server.mode, server.requests = "drop", []
  with pytest.raises(datasets.DatasetNotFoundError, match="IncompleteRead|incomplete"):
    datasets.load("mnist", "test")
  assert len(server.requests) == download.ATTEMPTS
  assert _cache_files(tmp_path) == []


def test_a_failed_download_is_one_line_naming_file_url_and_fix(server, tmp_path, capsys,
                                                               monkeypatch):
  monkeypatch.chdir(tmp_path)
  server.mode = "corrupt"
  assert cli.main(["attack", "mnist_softmax", "fgsm", "-n", "2"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  for phrase in ("t10k-images-idx3-ubyte.gz", server.url, "put it at", "--data-dir",
                 download.MIRRORS_ENV):
    assert phrase in err


def test_a_newcomers_suite_fetches_the_data_once_when_online(server, tmp_path):
  """conftest's fallback where no data folder is given: MNIST fetched into the download
  cache, verified, and the cache then serves as the tests' data folder."""
  from tests.conftest import downloaded

  folder = downloaded(("mnist",))
  assert folder == tmp_path / "cache"
  fetched = len(server.requests)
  assert fetched == 4  # the four original files, once
  images, labels = datasets.load("mnist", "test", str(folder))
  assert images.shape == (10000, 28, 28, 1) and labels.shape == (10000,)
  assert downloaded(("mnist",)) == folder and len(server.requests) == fetched  # cached


def test_offline_the_suite_skips_instead_of_failing(server, monkeypatch):
  from tests.conftest import downloaded

  server.mode = "corrupt"  # nothing verifiable to be had
  assert downloaded(("mnist",)) is None
  monkeypatch.setenv(download.DOWNLOAD_ENV, "0")
  assert downloaded(("mnist",)) is None

