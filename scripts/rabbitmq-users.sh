#!/usr/bin/env bash
# One RabbitMQ user per cistate role, with only the permissions that role needs.
#
#   scripts/rabbitmq-users.sh VHOST PREFIX
#
# VHOST: the virtual host cistate uses (made if missing); PREFIX: its CISTATE_BUS_PREFIX.
# Idempotent: run it again after an upgrade, or to reset the permissions.
#
#   user                  configure                 write                       read
#   cistate-producer      -                         exchange PREFIX,            -
#                                                   routing key push only
#   cistate-api           -                         exchange PREFIX,            -
#                                                   routing keys control, push
#   cistate-orchestrator  PREFIX, PREFIX.dead and cistate's queues (all three)
#   cistate-worker        PREFIX.step.*,            PREFIX (step.*.result       PREFIX.step.*,
#                         PREFIX.cancel.*           only), PREFIX.dead,         PREFIX.cancel.*,
#                                                   PREFIX.step.*,              PREFIX (binding
#                                                   PREFIX.cancel.*             step.*.run, cancel)
#
# Passwords: CISTATE_RABBITMQ_{PRODUCER,API,ORCHESTRATOR,WORKER}_PASSWORD if set (an existing
# user gets it as its new password); else a new user gets a random one, printed once on
# stdout, and an existing user keeps its own. They reach rabbitmqctl on its standard input,
# never on a command line.
#
# Environment: CISTATE_RABBITMQ_USER_PREFIX (default "cistate-"; users are per broker, not
# per vhost, so two deployments on one broker need different ones); RABBITMQCTL, the command
# to run (default "rabbitmqctl"; e.g. "docker compose exec -T rabbitmq rabbitmqctl" or
# "kubectl exec -i rabbitmq-0 -- rabbitmqctl"; it must pass standard input through).
set -euo pipefail

die() { printf 'rabbitmq-users.sh: %s\n' "$*" >&2; exit 2; }

[[ $# -eq 2 ]] || die "usage: $0 VHOST PREFIX (e.g. $0 / cistate)"
VHOST=$1
PREFIX=$2
# the same rule as CISTATE_BUS_PREFIX, so that the prefix needs no escaping but its dots
[[ $PREFIX =~ ^[a-zA-Z0-9_.-]{1,100}$ ]] \
    || die "PREFIX $PREFIX: use 1-100 letters, digits, '_', '.' or '-' (as CISTATE_BUS_PREFIX)"
[[ -n $VHOST ]] || die "VHOST is empty (the default vhost is /)"
USERS=${CISTATE_RABBITMQ_USER_PREFIX-cistate-}
read -r -a CTL <<<"${RABBITMQCTL:-rabbitmqctl}"

ctl() {
    "${CTL[@]}" --quiet "$@" || die "${CTL[*]} $* failed (see above)"
}

P=${PREFIX//./\\.}  # the prefix as a regular expression
STEP="$P\\.step\\.[^.]+"
CANCEL="$P\\.cancel\\..+"  # a worker id holds its host name, which may have dots

ctl add_vhost "$VHOST"  # succeeds when it exists already
existing=$(ctl list_users --no-table-headers | cut -f1)

# user, password variable, then configure/write/read and topic write/read on exchange PREFIX
# ("" for the topic pair: no topic limits, everything the other three allow)
setup() {
    local user=$USERS$1 variable=$2 configure=$3 write=$4 read=$5 topic_write=$6 topic_read=$7
    local password=${!variable-}
    if grep -qxF -- "$user" <<<"$existing"; then
        if [[ -n $password ]]; then
            printf '%s\n' "$password" | ctl change_password "$user"
            echo "$user: exists; password set from $variable"
        else
            echo "$user: exists; password unchanged"
        fi
    else
        if [[ -z $password ]]; then
            password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
            printf '%s\n' "$password" | ctl add_user "$user"
            echo "$user: created; password (shown once): $password"
        else
            printf '%s\n' "$password" | ctl add_user "$user"
            echo "$user: created; password from $variable"
        fi
    fi
    ctl set_user_tags "$user"  # no management tags: the HTTP API could change permissions
    # Topic limits before the permissions: a new user is never able to publish every key.
    if [[ -n $topic_write ]]; then
        ctl set_topic_permissions -p "$VHOST" "$user" "$PREFIX" "$topic_write" "$topic_read"
    else
        ctl clear_topic_permissions -p "$VHOST" "$user" "$PREFIX"
    fi
    ctl set_permissions -p "$VHOST" "$user" "$configure" "$write" "$read"
}

NONE='^$'
setup producer CISTATE_RABBITMQ_PRODUCER_PASSWORD \
    "$NONE" "^$P\$" "$NONE" '^push$' "$NONE"
setup api CISTATE_RABBITMQ_API_PASSWORD \
    "$NONE" "^$P\$" "$NONE" '^(control|push)$' "$NONE"
ALL="^$P(\\.(dead|orchestrator|notify|logs|step\\.[^.]+|cancel\\..+))?\$"
setup orchestrator CISTATE_RABBITMQ_ORCHESTRATOR_PASSWORD \
    "$ALL" "$ALL" "$ALL" "" ""
# A worker binds its queues (read on the exchange, topic read on the binding keys), consumes
# them, publishes results and dead-letters a command it refuses (write on PREFIX.dead).
setup worker CISTATE_RABBITMQ_WORKER_PASSWORD \
    "^($STEP|$CANCEL)\$" "^($P|$P\\.dead|$STEP|$CANCEL)\$" "^($P|$STEP|$CANCEL)\$" \
    '^step\.[^.]+\.(result|log)$' '^(step\.[^.]+\.run|cancel)$'
echo "permissions set on vhost $VHOST for prefix $PREFIX"
