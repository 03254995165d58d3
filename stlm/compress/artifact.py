"""The size of an export on disk: its files' bytes, and the same files as one .tar.xz.

The first figure is what the directory takes (Orbax already writes each array through zstd,
level 3, so even an uncompressed export is not raw float32). The second is the export as a
deterministic tar (sorted names, no dates or owners) compressed with lzma (xz, preset 6):
what a standard compressor makes of it. `artifact_size.json` records both; it is the record
of the measurement, not part of the model, so it is the one file left out of both figures.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import tarfile

SIZE_FILE = 'artifact_size.json'
LZMA_PRESET = 6
COMPRESSOR = f'xz (lzma preset {LZMA_PRESET}) of a tar of the export\'s files'


def files(export_dir: str) -> dict[str, int]:
  """Relative path -> bytes of every file of the export but SIZE_FILE, sorted by path."""
  out = {}
  for root, dirs, names in os.walk(export_dir):
    dirs.sort()
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, export_dir)
      if rel != SIZE_FILE:
        out[rel] = os.path.getsize(full)
  return dict(sorted(out.items()))


def tar_xz(export_dir: str) -> bytes:
  """The export's files as a tar compressed with lzma, the same bytes for the same files."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w', format=tarfile.USTAR_FORMAT) as tar:
    for rel in files(export_dir):
      info = tarfile.TarInfo(rel)
      info.size = os.path.getsize(os.path.join(export_dir, rel))
      info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, '', ''
      with open(os.path.join(export_dir, rel), 'rb') as f:
        tar.addfile(info, f)
  return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, preset=LZMA_PRESET)


def measure(export_dir: str) -> tuple[dict, bytes]:
  """(the size record, the .tar.xz bytes it measured)."""
  listing = files(export_dir)
  archive = tar_xz(export_dir)
  return dict(bytes=sum(listing.values()), xz_bytes=len(archive), compressor=COMPRESSOR,
              files=listing), archive


def write_record(export_dir: str, record: dict) -> None:
  with open(os.path.join(export_dir, SIZE_FILE), 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)


def sizes(export_dir: str) -> dict:
  """The size record of an export: SIZE_FILE where its file list still matches the export's
  files, else measured now (the tar.xz is then built in memory; nothing is written)."""
  try:
    with open(os.path.join(export_dir, SIZE_FILE), encoding='utf-8') as f:
      record = json.load(f)
    if record.get('files') == files(export_dir) and record.get('compressor') == COMPRESSOR:
      return record
  except (OSError, ValueError):
    pass
  return measure(export_dir)[0]
