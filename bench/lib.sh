# bench/lib.sh: what the bench scripts share (sourced by bench/*/run.sh).

# wait_iapt_port OUT ERR PID [SECONDS]: waits until `iapt serve` (process PID, stdout in OUT, stderr
# in ERR, started with --host 127.0.0.1 --port 0) prints its ready line, and prints the bound port.
# Fails, with the tail of ERR, when the server exits first or SECONDS (default 600) pass.
wait_iapt_port() {
  local out=$1 err=$2 pid=$3 limit=${4:-600} t0=$SECONDS port
  while :; do
    port=$(sed -n 's|^iapt serve: listening on http://127\.0\.0\.1:\([0-9]*\) .*|\1|p' "$out" 2>/dev/null)
    if [ -n "$port" ]; then
      echo "$port"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -20 "$err" >&2
      echo "iapt serve exited before it was ready ($err)" >&2
      return 1
    fi
    if [ $((SECONDS - t0)) -ge "$limit" ]; then
      echo "iapt serve printed no ready line in $limit s ($out)" >&2
      return 1
    fi
    sleep 0.2
  done
}
