"""A local GCS server for the tests: gcp-storage-emulator, plus the `x-goog-generation` header that real GCS
sends with every download and that tensorstore (orbax's OCDBT checkpoints) reads as the object's generation.

python tests/gcs_emulator.py PORT BUCKET — serves in memory on 127.0.0.1:PORT with BUCKET created.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:  # a missing object: the emulator's own handler answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routes from it

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
