#!/bin/bash
# usage: segs.sh ringlb|nginx RATE -> TCP segments per message, proxy CPU per message
BIN/ringlb-load echo --listen 127.0.0.1:47012 >/dev/null 2>&1 & E=$!
if [ $1 = ringlb ]; then BASE/ringlb run --config ./r1.toml >./r1.log 2>&1 & R=$!; PIDS=$R
else nginx -c ./ng/nginx.conf -g 'daemon off;' & R=$!; sleep 0.3; PIDS="$R $(pgrep -P $R)"; fi
sleep 0.5
BIN/ringlb-load rate --url ws://127.0.0.1:47011/ --connections 200 --rate $2 --duration 8s > ./rate.out 2>&1 & L=$!
sleep 2
cpu() { for p in $PIDS; do awk '{print $14+$15}' /proc/$p/stat; done | awk '{s+=$1} END{print s}'; }
nstat -n >/dev/null; u0=$(cpu)
sleep 5
u1=$(cpu); nstat -z TcpOutSegs TcpExtTCPPureAcks TcpExtDelayedACKs TcpExtTCPHPAcks TcpExtTCPBacklogCoalesce TcpExtTCPHPHits 2>/dev/null > ./nstat.out
M=$(( $2 * 5 ))
echo "$1 rate=$2 cpu_us/msg=$(echo "($u1-$u0)*10000/$M" | bc -l | cut -c1-5) $(awk -v m=$M 'NR>1 && $1 ~ /^Tcp/ {printf "%s/msg=%.3f ", $1, $2/m}' ./nstat.out)"
wait $L; kill $R $E; wait 2>/dev/null
