# Filter for torchrun's stderr, used by launch/torchrun.sh (see the comment there).
#
# Lines pass through as they come, except:
# - a `stem-...: ` line identical to one already passed (every rank says a failure's line);
# - torchrun's elastic-agent failure log lines ("Sending process N closing signal", "Received N death signal",
#   "failed (exitcode: N)"), held until the end;
# - everything from an unprefixed "Traceback (most recent call last):" (worker tracebacks are
#   prefixed "[rankN]:") held until the end. At the end, the part before the last such line is
#   printed, and the last part is torchrun's own report when it holds ChildFailedError or
#   SignalException. A held block that grows to 400 lines without either is not torchrun's
#   report (another traceback, the run goes on): it is printed and passing through resumes.
# At the end: the root-cause exit code (the first "exitcode  : N" after "Root Cause") goes to
# `code_file`, or 130 when torchrun stopped on SIGINT (it passed SIGINT on to its workers, which
# stop with 130; a SignalException report names no worker's code). torchrun's report and held log
# lines are dropped when that code is one a worker explains itself (2, 3, 4, 130) or torchrun
# stopped on a signal, else printed in full.
function flush_held(   i) {
    for (i = 1; i <= nheld; i++) print held[i]
    nheld = 0
}
BEGIN { nheld = 0; nbuf = 0; last_tb = 0; seen_report = 0 }
{
    if ($0 == "Traceback (most recent call last):") {
        buf[++nbuf] = $0
        last_tb = nbuf
        next
    }
    if (nbuf > 0) {
        buf[++nbuf] = $0
        # torchrun's report is its last ~60 lines: a longer block is some other traceback
        # followed by a run still going, whose lines must not wait for the end.
        if (nbuf >= 400 && !seen_report) { for (i = 1; i <= nbuf; i++) print buf[i]; nbuf = 0; last_tb = 0; fflush() }
        if ($0 ~ /ChildFailedError|SignalException/) seen_report = 1
        next
    }
    if ($0 ~ /^[WE][0-9]+ [0-9:.]+ [0-9]+ .*torch\/distributed\/elastic\/.*(closing signal|failed \(exitcode|death signal)/) {
        held[++nheld] = $0
        next
    }
    # Every rank says a failure's one line (STEM_ALL_RANKS_SAY, set by torchrun.sh): pass each once.
    if ($0 ~ /^stem-[a-z_-]+( [a-z]+)?: /) {
        if ($0 in said) next
        said[$0] = 1
    }
    print
    fflush()
}
END {
    code = ""; root = 0; report = 0; signalled = 0; sigint = 0
    for (i = last_tb; i >= 1 && i <= nbuf; i++) {
        if (buf[i] ~ /ChildFailedError/) report = 1
        if (buf[i] ~ /SignalException/) { report = 1; signalled = 1 }
        if (buf[i] ~ /SignalException: .* got signal: (2|SIGINT|Signals\.SIGINT)$/) sigint = 1
        if (buf[i] ~ /^Root Cause/) root = 1
        if (root && code == "" && buf[i] ~ /^ *exitcode *: *-?[0-9]+/) {
            code = buf[i]
            sub(/^ *exitcode *: */, "", code)
            sub(/[^-0-9].*$/, "", code)
        }
    }
    if (code == "" && sigint) code = 130
    if (code != "") print code > code_file
    for (i = 1; i < last_tb; i++) print buf[i]
    if (report && (signalled || code == 2 || code == 3 || code == 4 || code == 130)) exit 0
    flush_held()
    for (i = (last_tb ? last_tb : 1); i <= nbuf; i++) print buf[i]
}
