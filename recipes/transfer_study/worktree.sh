# Sourced by the study's one-command scripts: a git worktree of REPO at COMMIT in WORK/src (made once), its
# gmot first on PYTHONPATH, the current folder moved there, and `ablation` set to its ablation script.
#
#   source recipes/transfer_study/worktree.sh; study_worktree REPO WORK COMMIT
study_worktree() {
  mkdir -p "$2"
  [ -d "$2/src" ] || git -C "$1" worktree add --detach "$2/src" "$3"
  export PYTHONPATH=$2/src  # the worktree's gmot, not the venv's editable install
  cd "$2/src"
  ablation=benchmarks/ablation.py  # where it was at 2ba2070 and before
  [ -f "$ablation" ] || ablation=recipes/transfer_study/ablation.py
}
