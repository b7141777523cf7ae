"""The interop stage (scripts/interop.sh): emt against the real transformers, PEFT, tokenizers, open_clip and
safetensors. Each check prints PASS/FAIL with what it measured; the exit code is non-zero on any failure.

  python test/interop/run.py --emt build/test/interop/emt_interop --work build/interop [--only NAME ...]
"""
import argparse
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emt", required=True, help="the emt_interop executable")
    ap.add_argument("--work", required=True, help="scratch directory (emptied first)")
    ap.add_argument("--old-transformers", help="site dir of the pinned transformers < 4.52")
    ap.add_argument("--new-transformers", help="site dir of the pinned transformers 5.x")
    ap.add_argument("--only", nargs="*", help="run only checks whose name contains one of these")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    torch.set_num_threads(2)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    import transformers, peft, safetensors, tokenizers  # noqa: E401
    print(f"interop: transformers {transformers.__version__}, peft {peft.__version__}, "
          f"safetensors {safetensors.__version__}, tokenizers {tokenizers.__version__}, torch {torch.__version__}")
    start = time.time()
    report = common.Report(a.only)
    emt = common.Emt(os.path.abspath(a.emt))
    import check_llava
    models = check_llava.register(report, emt, a.work)
    import check_peft
    check_peft.register(report, emt, a.work, models)
    import check_llava_v0
    check_llava_v0.register(report, emt, a.work)
    import check_versions
    for site, with_peft, styles in ((a.old_transformers, True, ("old",)), (a.new_transformers, False, ("old", "new"))):
        if site:
            check_versions.register(report, emt, a.work, os.path.abspath(site), with_peft, styles)
    import check_tokenizers
    check_tokenizers.register(report, emt, a.work)
    import check_safetensors
    check_safetensors.register(report, emt, a.work)
    import check_fixtures
    check_fixtures.register(report)
    print(f"interop: {time.time() - start:.0f} s")
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
