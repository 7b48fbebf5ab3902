#!/usr/bin/env python3
"""pick_corpus.py CONTROL_FILE SEED_DIR OUT_DIR N: greedy set cover over libFuzzer merge features.

Seeds (files under SEED_DIR) are always kept; then up to N more files are picked, each time
the one adding the most features not yet covered (smaller first on ties), and copied to
OUT_DIR named by their SHA-1 (as libFuzzer names corpus files)."""
import hashlib, os, sys

ctl, seed_dir, out_dir, n = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3], int(sys.argv[4])
lines = open(ctl).read().splitlines()
count = int(lines[0])
paths = lines[2:2 + count]
size, feats = {}, {}
for line in lines[2 + count:]:
    parts = line.split()
    if parts[0] == "STARTED":
        size[int(parts[1])] = int(parts[2])
    elif parts[0] == "FT":
        feats[int(parts[1])] = set(map(int, parts[2:]))
covered = set()
for i, p in enumerate(paths):
    if os.path.realpath(p).startswith(seed_dir + os.sep):
        covered |= feats.get(i, set())
total = set().union(*feats.values()) if feats else set()
cands = [i for i, p in enumerate(paths) if not os.path.realpath(p).startswith(seed_dir + os.sep) and i in feats]
picked = []
while len(picked) < n:
    best = max(cands, key=lambda i: (len(feats[i] - covered), -size[i]), default=None)
    if best is None or not feats[best] - covered:
        break
    covered |= feats[best]
    picked.append(best)
    cands.remove(best)
os.makedirs(out_dir, exist_ok=True)
for i in picked:
    data = open(paths[i], "rb").read()
    with open(os.path.join(out_dir, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)
print(f"features: all={len(total)} kept={len(covered)} picked={len(picked)} "
      f"left_out={len(cands)} uncovered={len(total - covered)}")
