#!/bin/bash
# usage: hspn.sh WORKERS CLIENT(indep|rl) -> TLS handshakes through nginx: per-connection CPU by process, context switches
cd /tmp/exp
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!; target/release/ringlb-load echo --listen 127.0.0.1:27013 >/dev/null 2>&1 & E2=$!
sed -e "s/worker_processes 2;/worker_processes $1;/" -e "s/server 127.0.0.1:27012;/server 127.0.0.1:27012; server 127.0.0.1:27013;/" nginx-tls.conf > ngw.conf
nginx -p /tmp/exp/ngt -c /tmp/exp/ngw.conf -e /tmp/exp/ngt/error.log -g 'daemon off;' & N=$!; sleep 0.7
W=$(pgrep -P $N)
snap() { for p in $W; do echo "w$p $(awk '{print $14, $15}' /proc/$p/stat) $(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v, n}' /proc/$p/status)"; done; }
snap > s0
if [ $2 = indep ]; then bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1
else target/release/ringlb-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1; fi
snap > s1
echo "nginx workers=$1 client=$2: $(head -1 hs.out | cut -c1-60)"
paste s0 s1 | awk '{du=$7-$2; ds=$8-$3; dv=$9-$4; dn=$10-$5; if (du+ds>0 || dv>10) printf "  %-18s user %5.1f sys %5.1f us/conn  vol %.2f invol %.2f /conn\n", $1, du*10000/20000, ds*10000/20000, dv/20000, dn/20000}'
kill $N $E $E2; wait 2>/dev/null
