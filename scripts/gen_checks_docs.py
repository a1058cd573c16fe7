"""Write docs/checks.md from the doctor's registry (lora_doctor.checks.catalogue)."""

from pathlib import Path

from lora_doctor.checks.catalogue import markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "checks.md"
    out.write_text(markdown(), encoding="utf-8")
    print(f"wrote {out}")
