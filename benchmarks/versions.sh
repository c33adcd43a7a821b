# Sourced by ab_session.sh, profile_ncu.sh and profile_source.sh: what a VERSION argument means,
# and where the Nsight Compute CLI is.
# A version is `shipped` or a kernel_versions/ stem, optionally with knobs, NAME+KEY=VALUE[+...]:
# -DKEY=VALUE for the source, or an environment variable for a FLASHMLA_BACKEND_* key; or, for
# the profilers, peer:FA3-MLA / peer:FlashMLA (that peer's decode, from the vLLM bundle). A stem
# mla_combine_* is a combine version beside the shipped decode (its knobs go to the combine).

# with_version VERSION COMMAND...: runs COMMAND with that version's source file and knobs.
with_version() {
  local version=$1 stem file="" combine_file="" defines="" knob; local -a envs=(); shift
  stem=${version%%+*}
  case $stem in
  shipped | peer:*) ;;
  mla_combine_*) combine_file=$PWD/benchmarks/kernel_versions/$stem.cu ;;
  *) file=$PWD/benchmarks/kernel_versions/$stem.cu ;;
  esac
  if [ "$stem" != "$version" ]; then
    for knob in $(echo "${version#*+}" | tr '+' ' '); do
      case $knob in FLASHMLA_BACKEND_*) envs+=("$knob") ;; *) defines="$defines -D$knob" ;; esac
    done
  fi
  if [ -n "$combine_file" ]; then
    env "${envs[@]}" FLASHMLA_BACKEND_COMBINE_FILE="$combine_file" FLASHMLA_BACKEND_COMBINE_DEFINES="$defines" "$@"
  else
    env "${envs[@]}" FLASHMLA_BACKEND_DECODE_FILE="$file" FLASHMLA_BACKEND_DECODE_DEFINES="$defines" "$@"
  fi
}

# version_impl VERSION: profile_one_call.py's --impl (ours, FA3-MLA, FlashMLA).
version_impl() { case $1 in peer:*) echo "${1#peer:}" ;; *) echo ours ;; esac; }

# version_kernel VERSION: ncu's --kernel-name (demangled base) for that version's decode kernel.
version_kernel() {
  case $1 in
  peer:FA3-MLA) echo regex:FlashAttnFwdSm90 ;;
  peer:FlashMLA) echo regex:splitkv_mla ;;
  *) echo regex:^mla_decode ;;
  esac
}

# find_ncu: the Nsight Compute CLI of this machine (PATH, then the usual install folders).
find_ncu() {
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -x "$ncu" ] && echo "$ncu"
}
