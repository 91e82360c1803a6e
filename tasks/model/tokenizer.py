"""The tokenizer of any model folder the pipeline accepts (README "Which models"): transformers'
own for a native folder, the converted one of a ChatGLM2/3 or GLM-4 folder (built in memory);
never the folder's code, never transformers' interactive remote-code prompt. Light: no torch.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config.model_folder import FolderKind, classify
from tasks.runtime.errors import DataError


def tokenizer_of(folder: Path | str, **kwargs):
    """The tokenizer of a model folder: transformers' own (never the folder's code), or the
    converted one of a ChatGLM2/3 or GLM-4 folder (built in memory); a folder that needs its
    own code fails in one line (`DataError`), never with transformers' interactive prompt."""
    kind = classify(folder) if Path(folder).is_dir() else FolderKind("native")
    if kind.kind == "refused":
        raise DataError(folder, kind.reason or "needs code of its own")
    if kind.kind == "convert":
        from tasks.model.chatglm_tokenizer import build_tokenizer

        return build_tokenizer(Path(folder), kind.family)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)


def data_tokenizer(folder: Path):
    """`data.tokenizer`'s tokenizer, for the token lengths of the data report: a folder that
    does not load is one line naming it."""
    try:
        return tokenizer_of(folder, local_files_only=True)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(folder, f"data.tokenizer: not a loadable Hugging Face tokenizer folder "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
