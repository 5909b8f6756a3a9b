"""The pdllm command end to end on the tiny checkpoint."""

import pytest

from pdllm.cli import main


def test_generate_plain_prompt(llada_dir, capsys):
    assert main(["generate", "--model", str(llada_dir), "--prompt", "what is the pass key", "--gen-length", "8",
                 "--block-length", "4", "--steps", "8", "--method", "vanilla"]) == 0
    out, err = capsys.readouterr()
    assert "[vanilla]" in err and "nfe 8" in err and out.strip() != ""


@pytest.mark.parametrize("extra", [[], ["--visual"], ["--threshold", "0.5", "--score", "draft", "--token-capacity", "5"]])
def test_generate_long_context_with_prefill(llada_dir, tmp_path, capsys, extra):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    assert main(["generate", "--model", str(llada_dir), "--context-file", str(ctx), "--question", "what is the pass key",
                 "--gen-length", "8", "--block-length", "8", "--steps", "8", "--method", "prefill",
                 "--chunk-size", "16", "--top-k", "2", *extra]) == 0
    err = capsys.readouterr().err
    assert "[prefill]" in err and "selected chunks" in err
    if "--visual" in extra:
        assert "block 0 step" in err and "◀ selected" in err


def test_generate_dream_checkpoint(dream_dir, capsys):
    assert main(["generate", "--model", str(dream_dir), "--prompt", "hello", "--gen-length", "4", "--block-length", "4",
                 "--steps", "4"]) == 0


def test_generate_argument_errors(llada_dir, tmp_path):
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--model", str(llada_dir)])
    with pytest.raises(SystemExit, match="go together"):
        main(["generate", "--model", str(llada_dir), "--question", "q"])
    with pytest.raises(SystemExit, match="needs --context-file"):
        main(["generate", "--model", str(llada_dir), "--prompt", "q", "--method", "prefill"])
    from pdllm.model import CheckpointError
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["generate", "--model", str(tmp_path / "none"), "--prompt", "q"])
