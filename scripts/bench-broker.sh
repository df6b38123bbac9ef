# Sourced by the benchmarks: starts the broker they run on, $NPSFLOW_BENCH_BROKER (Tansu with
# sqlite storage, the default, or noida-db), on loopback port $1 with its data under $2.
#   start_bench_broker PORT WORKDIR; seed_bench_input BIN COUNT; ...; "scripts/$broker.sh" stop PORT
broker="${NPSFLOW_BENCH_BROKER:-tansu}"
start_bench_broker() { # port workdir
  case "$broker" in
  tansu)
    # Tansu resolves sqlite paths relative to its working directory (the repository root).
    scripts/tansu.sh start "$1" "sqlite:///$2/tansu.db"
    ;;
  noida)
    scripts/noida.sh start "$1" "$PWD/$2/noida"
    # noida-db's cooperative-sticky rebalancing hangs; one process needs no rebalancing, but
    # the group still has to form.
    export NPSFLOW__KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY=range
    ;;
  *)
    echo "NPSFLOW_BENCH_BROKER: tansu or noida" >&2
    exit 2
    ;;
  esac
}

# Creates npsflow's topics on the broker ($NPSFLOW__KAFKA__BROKERS) and produces COUNT seeded
# responses to the input before any consumer starts.
seed_bench_input() { # bin count
  "$1" topics create >/dev/null
  echo "== producing $2 seeded messages ($broker)"
  "$1" loadgen --count "$2" --rate 0 --seed 7 >/dev/null 2>&1
}
