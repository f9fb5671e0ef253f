//! The AWS calls of one broker, each create-or-adopt step idempotent (a second apply finds
//! what the first made), and delete in reverse order tolerating what is already gone.

use super::aws::{classify, settle, Aws, AwsError};
use super::config::{EcsSettings, LoadBalancer, Storage};
use super::ec2::tag;
use super::record::EcsRecord;
use super::render::{NodeTask, CLIENT_PORT, CLUSTER_PORT, CONTAINER, MONITOR_PORT, VOLUME};
use std::time::{Duration, Instant};

/// The tag on a task definition saying what it was rendered from.
pub const TAG_SPEC: &str = "eventbus-spec-sha256";
/// How long a step waits for AWS's eventual consistency.
const SETTLE: Duration = Duration::from_secs(180);

pub fn poll_interval() -> Duration {
    std::env::var("EVENTBUS_ECS_POLL_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(5))
}

fn ecs_tags(s: &EcsSettings) -> Vec<aws_sdk_ecs::types::Tag> {
    s.tags
        .iter()
        .map(|(k, v)| aws_sdk_ecs::types::Tag::builder().key(k).value(v).build())
        .collect()
}

/// The cluster's ARN, and whether this call created it.
pub async fn ensure_cluster(aws: &Aws, s: &EcsSettings) -> Result<(String, bool), AwsError> {
    let found = aws
        .ecs
        .describe_clusters()
        .clusters(&s.cluster)
        .send()
        .await
        .map_err(|e| classify("ecs:DescribeClusters", e))?;
    if let Some(c) = found
        .clusters()
        .iter()
        .find(|c| c.status() == Some("ACTIVE"))
    {
        return Ok((c.cluster_arn().unwrap_or_default().to_string(), false));
    }
    let made = aws
        .ecs
        .create_cluster()
        .cluster_name(&s.cluster)
        .set_tags(Some(ecs_tags(s)))
        .send()
        .await
        .map_err(|e| classify("ecs:CreateCluster", e))?;
    let arn = made
        .cluster()
        .and_then(|c| c.cluster_arn())
        .unwrap_or_default()
        .to_string();
    tracing::info!(cluster = %s.cluster, "ECS cluster created");
    Ok((arn, true))
}

pub async fn ensure_log_group(aws: &Aws, s: &EcsSettings) -> Result<(), AwsError> {
    let g = &s.names.log_group;
    match aws
        .logs
        .create_log_group()
        .log_group_name(g)
        .set_tags(Some(s.tags.clone().into_iter().collect()))
        .send()
        .await
    {
        Ok(_) => tracing::info!(log_group = %g, "log group created"),
        Err(e) if e.code() == Some("ResourceAlreadyExistsException") => {}
        Err(e) => return Err(classify("logs:CreateLogGroup", e)),
    }
    aws.logs
        .put_retention_policy()
        .log_group_name(g)
        .retention_in_days(s.log_retention_days)
        .send()
        .await
        .map_err(|e| classify("logs:PutRetentionPolicy", e))?;
    Ok(())
}

use aws_sdk_ecs::error::ProvideErrorMetadata;

/// The broker's security group: 4222 from the named clients and from itself (the load
/// balancer carries it too), 6222 and 8222 from itself only.
pub async fn ensure_security_group(aws: &Aws, s: &EcsSettings) -> Result<String, AwsError> {
    let name = &s.names.security_group;
    let p = |k: &str, v: &str| (k.to_string(), v.to_string());
    let found = aws
        .ec2
        .call(
            "DescribeSecurityGroups",
            &[
                p("Filter.1.Name", "group-name"),
                p("Filter.1.Value.1", name),
                p("Filter.2.Name", "vpc-id"),
                p("Filter.2.Value.1", &s.vpc_id),
            ],
        )
        .await?;
    let id = match tag(&found, "groupId") {
        Some(id) => id,
        None => {
            let mut params = vec![
                p("GroupName", name),
                p(
                    "GroupDescription",
                    &format!(
                        "NATS JetStream broker {} (workflow-plugin-eventbus)",
                        s.names.base
                    ),
                ),
                p("VpcId", &s.vpc_id),
                p("TagSpecification.1.ResourceType", "security-group"),
            ];
            for (n, (k, v)) in s.tags.iter().enumerate() {
                params.push(p(&format!("TagSpecification.1.Tag.{}.Key", n + 1), k));
                params.push(p(&format!("TagSpecification.1.Tag.{}.Value", n + 1), v));
            }
            let made = aws.ec2.call("CreateSecurityGroup", &params).await?;
            let id = tag(&made, "groupId").ok_or_else(|| AwsError::Other {
                op: "ec2:CreateSecurityGroup".into(),
                code: "NoGroupId".into(),
                message: "the answer has no groupId".into(),
            })?;
            tracing::info!(security_group = %id, "security group created");
            id
        }
    };
    // One source per call: a rule already there fails only its own call.
    let mut rules: Vec<(u16, &str, String)> = vec![
        (CLIENT_PORT, "Groups.1.GroupId", id.clone()),
        (CLUSTER_PORT, "Groups.1.GroupId", id.clone()),
        (MONITOR_PORT, "Groups.1.GroupId", id.clone()),
    ];
    for c in &s.client_cidrs {
        let key = if c.contains(':') {
            "Ipv6Ranges.1.CidrIpv6"
        } else {
            "IpRanges.1.CidrIp"
        };
        rules.push((CLIENT_PORT, key, c.clone()));
    }
    for g in &s.client_security_groups {
        rules.push((CLIENT_PORT, "Groups.1.GroupId", g.clone()));
    }
    for (port, key, source) in rules {
        let params = [
            p("GroupId", &id),
            p("IpPermissions.1.IpProtocol", "tcp"),
            p("IpPermissions.1.FromPort", &port.to_string()),
            p("IpPermissions.1.ToPort", &port.to_string()),
            p(&format!("IpPermissions.1.{key}"), &source),
        ];
        match aws.ec2.call("AuthorizeSecurityGroupIngress", &params).await {
            Ok(_) => {}
            Err(AwsError::Other { code, .. } | AwsError::Invalid { code, .. })
                if code == "InvalidPermission.Duplicate" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(id)
}

/// The broker's secret (created, or its value replaced when it differs); its ARN.
pub async fn ensure_secret(aws: &Aws, s: &EcsSettings, value: &str) -> Result<String, AwsError> {
    let name = &s.names.secret;
    let tags: Vec<aws_sdk_secretsmanager::types::Tag> = s
        .tags
        .iter()
        .map(|(k, v)| {
            aws_sdk_secretsmanager::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
        })
        .collect();
    match aws
        .secrets
        .create_secret()
        .name(name)
        .description("NATS credentials of a workflow-plugin-eventbus broker")
        .secret_string(value)
        .set_tags(Some(tags))
        .send()
        .await
    {
        Ok(o) => {
            tracing::info!(secret = %name, "secret created");
            return Ok(o.arn().unwrap_or_default().to_string());
        }
        Err(e) if e.code() == Some("ResourceExistsException") => {}
        Err(e) => return Err(classify("secretsmanager:CreateSecret", e)),
    }
    let now = aws
        .secrets
        .get_secret_value()
        .secret_id(name)
        .send()
        .await
        .map_err(|e| classify("secretsmanager:GetSecretValue", e))?;
    let arn = now.arn().unwrap_or_default().to_string();
    if now.secret_string() != Some(value) {
        aws.secrets
            .put_secret_value()
            .secret_id(name)
            .secret_string(value)
            .send()
            .await
            .map_err(|e| classify("secretsmanager:PutSecretValue", e))?;
        tracing::info!(secret = %name, "secret value replaced");
    }
    Ok(arn)
}

/// The Cloud Map private DNS namespace's id (created and waited for when missing).
pub async fn ensure_namespace(
    aws: &Aws,
    s: &EcsSettings,
    poll: Duration,
) -> Result<String, AwsError> {
    let name = &s.names.namespace;
    if let Some(id) = find_namespace(aws, name).await? {
        return Ok(id);
    }
    let tags: Vec<aws_sdk_servicediscovery::types::Tag> = s
        .tags
        .iter()
        .filter_map(|(k, v)| {
            aws_sdk_servicediscovery::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
                .ok()
        })
        .collect();
    let op = aws
        .discovery
        .create_private_dns_namespace()
        .name(name)
        .vpc(&s.vpc_id)
        .creator_request_id(format!("eventbus-{}", s.names.base))
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("servicediscovery:CreatePrivateDnsNamespace", e))?;
    wait_operation(aws, op.operation_id().unwrap_or_default(), poll).await?;
    tracing::info!(namespace = %name, "Cloud Map namespace created");
    find_namespace(aws, name)
        .await?
        .ok_or_else(|| AwsError::NotReady {
            what: format!("Cloud Map namespace {name}"),
            waited: SETTLE,
            state: "created but not listed".into(),
        })
}

async fn find_namespace(aws: &Aws, name: &str) -> Result<Option<String>, AwsError> {
    let mut pages = aws.discovery.list_namespaces().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify("servicediscovery:ListNamespaces", e))?;
        if let Some(n) = page.namespaces().iter().find(|n| n.name() == Some(name)) {
            return Ok(n.id().map(str::to_string));
        }
    }
    Ok(None)
}

async fn wait_operation(aws: &Aws, id: &str, poll: Duration) -> Result<(), AwsError> {
    use aws_sdk_servicediscovery::types::OperationStatus;
    let start = Instant::now();
    loop {
        let o = aws
            .discovery
            .get_operation()
            .operation_id(id)
            .send()
            .await
            .map_err(|e| classify("servicediscovery:GetOperation", e))?;
        let op = o.operation();
        match op.and_then(|o| o.status()) {
            Some(OperationStatus::Success) => return Ok(()),
            Some(OperationStatus::Fail) => {
                return Err(AwsError::Other {
                    op: "servicediscovery:GetOperation".into(),
                    code: op
                        .and_then(|o| o.error_code())
                        .unwrap_or("FAIL")
                        .to_string(),
                    message: op
                        .and_then(|o| o.error_message())
                        .unwrap_or_default()
                        .to_string(),
                })
            }
            _ if start.elapsed() > SETTLE => {
                return Err(AwsError::NotReady {
                    what: format!("Cloud Map operation {id}"),
                    waited: SETTLE,
                    state: "still pending".into(),
                })
            }
            _ => tokio::time::sleep(poll.min(Duration::from_secs(2))).await,
        }
    }
}

/// Node `i`'s Cloud Map service ARN (created when missing): an A record per task, short TTL.
pub async fn ensure_discovery(
    aws: &Aws,
    s: &EcsSettings,
    namespace_id: &str,
    i: u32,
) -> Result<String, AwsError> {
    use aws_sdk_servicediscovery::types::{
        DnsConfig, DnsRecord, FilterCondition, HealthCheckCustomConfig, RecordType, RoutingPolicy,
        ServiceFilter, ServiceFilterName,
    };
    let name = s.names.node(i);
    let mut pages = aws
        .discovery
        .list_services()
        .filters(
            ServiceFilter::builder()
                .name(ServiceFilterName::NamespaceId)
                .values(namespace_id)
                .condition(FilterCondition::Eq)
                .build()
                .map_err(|e| AwsError::Conflict(e.to_string()))?,
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify("servicediscovery:ListServices", e))?;
        if let Some(found) = page
            .services()
            .iter()
            .find(|x| x.name() == Some(name.as_str()))
        {
            return Ok(found.arn().unwrap_or_default().to_string());
        }
    }
    let made = aws
        .discovery
        .create_service()
        .name(&name)
        .namespace_id(namespace_id)
        .creator_request_id(format!("eventbus-{}-{name}", s.names.base))
        .dns_config(
            DnsConfig::builder()
                .routing_policy(RoutingPolicy::Multivalue)
                .dns_records(
                    DnsRecord::builder()
                        .r#type(RecordType::A)
                        .ttl(10)
                        .build()
                        .map_err(|e| AwsError::Conflict(e.to_string()))?,
                )
                .build()
                .map_err(|e| AwsError::Conflict(e.to_string()))?,
        )
        .health_check_custom_config(HealthCheckCustomConfig::builder().build())
        .send()
        .await
        .map_err(|e| classify("servicediscovery:CreateService", e))?;
    Ok(made
        .service()
        .and_then(|x| x.arn())
        .unwrap_or_default()
        .to_string())
}

/// The load balancer, its target group and listener (ARNs) and its DNS name.
pub struct Balancer {
    pub arn: String,
    pub dns: String,
    pub target_group: String,
    pub listener: String,
}

pub async fn ensure_load_balancer(
    aws: &Aws,
    s: &EcsSettings,
    sg: &str,
) -> Result<Option<Balancer>, AwsError> {
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
        TargetTypeEnum,
    };
    let scheme = match s.load_balancer {
        LoadBalancer::None => return Ok(None),
        LoadBalancer::Internal => LoadBalancerSchemeEnum::Internal,
        LoadBalancer::Public => LoadBalancerSchemeEnum::InternetFacing,
    };
    let tags: Vec<Tag> = s
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let n = &s.names;
    let existing = match aws
        .elb
        .describe_load_balancers()
        .names(&n.load_balancer)
        .send()
        .await
    {
        Ok(o) => o.load_balancers().first().cloned(),
        Err(e) if e.code() == Some("LoadBalancerNotFound") => None,
        Err(e) => return Err(classify("elasticloadbalancing:DescribeLoadBalancers", e)),
    };
    let lb = match existing {
        Some(lb) => lb,
        None => {
            let made = aws
                .elb
                .create_load_balancer()
                .name(&n.load_balancer)
                .r#type(LoadBalancerTypeEnum::Network)
                .scheme(scheme)
                .set_subnets(Some(s.subnets.clone()))
                .security_groups(sg)
                .set_tags(Some(tags.clone()))
                .send()
                .await
                .map_err(|e| classify("elasticloadbalancing:CreateLoadBalancer", e))?;
            tracing::info!(load_balancer = %n.load_balancer, "network load balancer created");
            made.load_balancers().first().cloned().unwrap_or_else(|| {
                aws_sdk_elasticloadbalancingv2::types::LoadBalancer::builder().build()
            })
        }
    };
    let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let dns = lb.dns_name().unwrap_or_default().to_string();
    let tg = match aws
        .elb
        .describe_target_groups()
        .names(&n.target_group)
        .send()
        .await
    {
        Ok(o) => o.target_groups().first().cloned(),
        Err(e) if e.code() == Some("TargetGroupNotFound") => None,
        Err(e) => return Err(classify("elasticloadbalancing:DescribeTargetGroups", e)),
    };
    let tg = match tg {
        Some(t) => t,
        None => aws
            .elb
            .create_target_group()
            .name(&n.target_group)
            .protocol(ProtocolEnum::Tcp)
            .port(CLIENT_PORT as i32)
            .vpc_id(&s.vpc_id)
            .target_type(TargetTypeEnum::Ip)
            .health_check_protocol(ProtocolEnum::Http)
            .health_check_port(MONITOR_PORT.to_string())
            .health_check_path("/healthz")
            .set_tags(Some(tags.clone()))
            .send()
            .await
            .map_err(|e| classify("elasticloadbalancing:CreateTargetGroup", e))?
            .target_groups()
            .first()
            .cloned()
            .unwrap_or_else(|| {
                aws_sdk_elasticloadbalancingv2::types::TargetGroup::builder().build()
            }),
    };
    let tg_arn = tg.target_group_arn().unwrap_or_default().to_string();
    let listeners = aws
        .elb
        .describe_listeners()
        .load_balancer_arn(&arn)
        .send()
        .await
        .map_err(|e| classify("elasticloadbalancing:DescribeListeners", e))?;
    let listener = match listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(CLIENT_PORT as i32))
    {
        Some(l) => l.listener_arn().unwrap_or_default().to_string(),
        None => aws
            .elb
            .create_listener()
            .load_balancer_arn(&arn)
            .protocol(ProtocolEnum::Tcp)
            .port(CLIENT_PORT as i32)
            .default_actions(
                Action::builder()
                    .r#type(ActionTypeEnum::Forward)
                    .target_group_arn(&tg_arn)
                    .build(),
            )
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify("elasticloadbalancing:CreateListener", e))?
            .listeners()
            .first()
            .and_then(|l| l.listener_arn())
            .unwrap_or_default()
            .to_string(),
    };
    Ok(Some(Balancer {
        arn,
        dns,
        target_group: tg_arn,
        listener,
    }))
}

/// The ARN of node task `t`: the family's latest revision when it was rendered from the same
/// settings, otherwise a new revision.
pub async fn register_task(aws: &Aws, s: &EcsSettings, t: &NodeTask) -> Result<String, AwsError> {
    use aws_sdk_ecs::types::{Compatibility, NetworkMode, TaskDefinitionField};
    match aws
        .ecs
        .describe_task_definition()
        .task_definition(&t.family)
        .include(TaskDefinitionField::Tags)
        .send()
        .await
    {
        Ok(o) => {
            let same = o
                .tags()
                .iter()
                .any(|x| x.key() == Some(TAG_SPEC) && x.value() == Some(t.sha256.as_str()));
            let active = o
                .task_definition()
                .and_then(|d| d.status())
                .map(|s| s.as_str())
                == Some("ACTIVE");
            if let (true, true, Some(arn)) = (
                same,
                active,
                o.task_definition().and_then(|d| d.task_definition_arn()),
            ) {
                return Ok(arn.to_string());
            }
        }
        Err(e) => {
            let e = classify("ecs:DescribeTaskDefinition", e);
            if !matches!(e, AwsError::Invalid { .. } | AwsError::NotFound { .. }) {
                return Err(e);
            }
        }
    }
    let mut tags = ecs_tags(s);
    tags.push(
        aws_sdk_ecs::types::Tag::builder()
            .key(TAG_SPEC)
            .value(&t.sha256)
            .build(),
    );
    let out = aws
        .ecs
        .register_task_definition()
        .family(&t.family)
        .network_mode(NetworkMode::Awsvpc)
        .requires_compatibilities(Compatibility::Fargate)
        .cpu(&s.cpu)
        .memory(&s.memory)
        .execution_role_arn(&s.execution_role_arn)
        .set_task_role_arn(s.task_role_arn.clone())
        .container_definitions(t.container.clone())
        .set_volumes(Some(t.volumes.clone()))
        .set_ephemeral_storage(t.ephemeral.clone())
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| classify("ecs:RegisterTaskDefinition", e))?;
    let arn = out
        .task_definition()
        .and_then(|d| d.task_definition_arn())
        .unwrap_or_default()
        .to_string();
    tracing::info!(family = %t.family, task_definition = %arn, "task definition registered");
    Ok(arn)
}

/// An ECS service as this target reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceNow {
    pub arn: String,
    pub task_definition: String,
    pub desired: i32,
}

/// Node services by name; absent = missing, draining or inactive.
pub async fn services(
    aws: &Aws,
    cluster: &str,
    names: &[String],
) -> Result<Vec<Option<ServiceNow>>, AwsError> {
    let mut out = Vec::new();
    for chunk in names.chunks(10) {
        let found = match aws
            .ecs
            .describe_services()
            .cluster(cluster)
            .set_services(Some(chunk.to_vec()))
            .send()
            .await
        {
            Ok(f) => f,
            Err(e) => {
                let e = classify("ecs:DescribeServices", e);
                if matches!(&e, AwsError::NotFound { code, .. } if code == "ClusterNotFoundException")
                {
                    out.extend(chunk.iter().map(|_| None));
                    continue;
                }
                return Err(e);
            }
        };
        for n in chunk {
            out.push(
                found
                    .services()
                    .iter()
                    .find(|x| x.service_name() == Some(n.as_str()) && x.status() == Some("ACTIVE"))
                    .map(|x| ServiceNow {
                        arn: x.service_arn().unwrap_or_default().to_string(),
                        task_definition: x.task_definition().unwrap_or_default().to_string(),
                        desired: x.desired_count(),
                    }),
            );
        }
    }
    Ok(out)
}

/// What one node's service needs.
pub struct NodeService<'a> {
    pub name: String,
    pub task_definition: &'a str,
    pub registry_arn: &'a str,
    pub security_group: &'a str,
    pub target_group: Option<&'a str>,
}

fn deployment() -> aws_sdk_ecs::types::DeploymentConfiguration {
    // Never two tasks of one node: the old one stops before its replacement starts.
    aws_sdk_ecs::types::DeploymentConfiguration::builder()
        .maximum_percent(100)
        .minimum_healthy_percent(0)
        .build()
}

pub async fn create_service(
    aws: &Aws,
    s: &EcsSettings,
    n: &NodeService<'_>,
) -> Result<String, AwsError> {
    use aws_sdk_ecs::types::{
        AssignPublicIp, AwsVpcConfiguration, EbsResourceType, LaunchType, LoadBalancer as EcsLb,
        NetworkConfiguration, PropagateTags, ServiceManagedEbsVolumeConfiguration, ServiceRegistry,
        ServiceVolumeConfiguration,
    };
    let net = NetworkConfiguration::builder()
        .awsvpc_configuration(
            AwsVpcConfiguration::builder()
                .set_subnets(Some(s.subnets.clone()))
                .security_groups(n.security_group)
                .assign_public_ip(AssignPublicIp::Disabled)
                .build()
                .map_err(|e| AwsError::Conflict(e.to_string()))?,
        )
        .build();
    let mut req = aws
        .ecs
        .create_service()
        .cluster(&s.cluster)
        .service_name(&n.name)
        .task_definition(n.task_definition)
        .desired_count(1)
        .launch_type(LaunchType::Fargate)
        .network_configuration(net)
        .service_registries(
            ServiceRegistry::builder()
                .registry_arn(n.registry_arn)
                .build(),
        )
        .deployment_configuration(deployment())
        .propagate_tags(PropagateTags::Service)
        .enable_ecs_managed_tags(true)
        .set_tags(Some(ecs_tags(s)));
    if let Some(tg) = n.target_group {
        req = req
            .load_balancers(
                EcsLb::builder()
                    .target_group_arn(tg)
                    .container_name(CONTAINER)
                    .container_port(CLIENT_PORT as i32)
                    .build(),
            )
            .health_check_grace_period_seconds(60);
    }
    if let Storage::Ebs {
        volume_type,
        size_gib,
        role_arn,
    } = &s.storage
    {
        req = req.volume_configurations(
            ServiceVolumeConfiguration::builder()
                .name(VOLUME)
                .managed_ebs_volume(
                    ServiceManagedEbsVolumeConfiguration::builder()
                        .role_arn(role_arn)
                        .volume_type(volume_type)
                        .size_in_gib(*size_gib as i32)
                        .encrypted(true)
                        .filesystem_type(aws_sdk_ecs::types::TaskFilesystemType::Ext4)
                        .tag_specifications(
                            aws_sdk_ecs::types::EbsTagSpecification::builder()
                                .resource_type(EbsResourceType::Volume)
                                .set_tags(Some(ecs_tags(s)))
                                .build()
                                .map_err(|e| AwsError::Conflict(e.to_string()))?,
                        )
                        .build()
                        .map_err(|e| AwsError::Conflict(e.to_string()))?,
                )
                .build()
                .map_err(|e| AwsError::Conflict(e.to_string()))?,
        );
    }
    let out = settle(SETTLE, || {
        let req = req.clone();
        async move {
            req.send()
                .await
                .map_err(|e| classify("ecs:CreateService", e))
        }
    })
    .await?;
    tracing::info!(service = %n.name, "ECS service created");
    Ok(out
        .service()
        .and_then(|x| x.service_arn())
        .unwrap_or_default()
        .to_string())
}

/// Points a node's service at `task_definition` with one task.
pub async fn update_service(
    aws: &Aws,
    cluster: &str,
    name: &str,
    task_definition: &str,
) -> Result<(), AwsError> {
    aws.ecs
        .update_service()
        .cluster(cluster)
        .service(name)
        .task_definition(task_definition)
        .desired_count(1)
        .deployment_configuration(deployment())
        .force_new_deployment(true)
        .send()
        .await
        .map_err(|e| classify("ecs:UpdateService", e))?;
    tracing::info!(service = %name, task_definition = %task_definition, "ECS service updated");
    Ok(())
}

/// Waits until node service `name` (task family `name`) runs exactly one task, started by
/// the service's primary deployment of `task_definition` (ECS marks a service's tasks
/// `startedBy` the deployment's id); the old task is stopped first.
pub async fn wait_task(
    aws: &Aws,
    cluster: &str,
    name: &str,
    task_definition: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(), AwsError> {
    use aws_sdk_ecs::types::DesiredStatus;
    let start = Instant::now();
    loop {
        let svc = aws
            .ecs
            .describe_services()
            .cluster(cluster)
            .services(name)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeServices", e))?;
        let s = svc.services().iter().find(|x| x.status() == Some("ACTIVE"));
        let primary = s
            .and_then(|x| {
                x.deployments()
                    .iter()
                    .find(|d| d.status() == Some("PRIMARY"))
            })
            .and_then(|d| d.id())
            .unwrap_or_default()
            .to_string();
        let state = if s.and_then(|x| x.task_definition()) != Some(task_definition) {
            "the service is not on the new task definition yet".to_string()
        } else {
            let count = |started_by: Option<String>, family: Option<&str>| {
                let req = aws
                    .ecs
                    .list_tasks()
                    .cluster(cluster)
                    .set_started_by(started_by)
                    .set_family(family.map(str::to_string))
                    .desired_status(DesiredStatus::Running);
                async move {
                    req.send()
                        .await
                        .map(|o| o.task_arns().len())
                        .map_err(|e| classify("ecs:ListTasks", e))
                }
            };
            let new = count(Some(primary.clone()), None).await?;
            let all = count(None, Some(name)).await?;
            if new == 1 && all == 1 {
                return Ok(());
            }
            format!("{new} task(s) of deployment {primary} running, {all} of the node in all")
        };
        if start.elapsed() >= timeout {
            return Err(AwsError::NotReady {
                what: format!("the task of {name}"),
                waited: timeout,
                state: format!(
                    "{state} (aws ecs describe-services --cluster {cluster} --services {name})"
                ),
            });
        }
        tracing::info!(service = %name, %state, "waiting for the node's task");
        tokio::time::sleep(poll).await;
    }
}

/// Removes what `rec` lists, last made first; what is already gone is skipped.
pub async fn delete_all(aws: &Aws, rec: &EcsRecord) -> Result<(), AwsError> {
    let gone = |r: Result<(), AwsError>| match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    };
    for name in rec.services.iter().rev() {
        gone(
            async {
                aws.ecs
                    .update_service()
                    .cluster(&rec.cluster)
                    .service(name)
                    .desired_count(0)
                    .send()
                    .await
                    .map_err(|e| classify("ecs:UpdateService", e))?;
                aws.ecs
                    .delete_service()
                    .cluster(&rec.cluster)
                    .service(name)
                    .force(true)
                    .send()
                    .await
                    .map_err(|e| classify("ecs:DeleteService", e))?;
                tracing::info!(service = %name, "ECS service deleted");
                Ok(())
            }
            .await,
        )
        .or_else(|e| match &e {
            AwsError::Invalid { code, .. } if code == "ServiceNotActiveException" => Ok(()),
            _ => Err(e),
        })?;
    }
    for td in rec.task_definitions.iter().rev() {
        gone(
            aws.ecs
                .deregister_task_definition()
                .task_definition(td)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("ecs:DeregisterTaskDefinition", e)),
        )
        .or_else(|e| {
            if matches!(e, AwsError::Invalid { .. }) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    if !rec.listener_arn.is_empty() {
        gone(
            aws.elb
                .delete_listener()
                .listener_arn(&rec.listener_arn)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("elasticloadbalancing:DeleteListener", e)),
        )?;
    }
    if !rec.load_balancer_arn.is_empty() {
        gone(
            aws.elb
                .delete_load_balancer()
                .load_balancer_arn(&rec.load_balancer_arn)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("elasticloadbalancing:DeleteLoadBalancer", e)),
        )?;
        tracing::info!(load_balancer = %rec.load_balancer_arn, "load balancer deleted");
    }
    if !rec.target_group_arn.is_empty() {
        gone(
            settle(SETTLE, || async {
                aws.elb
                    .delete_target_group()
                    .target_group_arn(&rec.target_group_arn)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("elasticloadbalancing:DeleteTargetGroup", e))
            })
            .await,
        )?;
    }
    for arn in rec.discovery_services.iter().rev() {
        let id = arn.rsplit('/').next().unwrap_or(arn);
        gone(
            settle(SETTLE, || async {
                aws.discovery
                    .delete_service()
                    .id(id)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("servicediscovery:DeleteService", e))
            })
            .await,
        )?;
    }
    if !rec.namespace_id.is_empty() {
        let r = settle(SETTLE, || async {
            aws.discovery
                .delete_namespace()
                .id(&rec.namespace_id)
                .send()
                .await
                .map_err(|e| classify("servicediscovery:DeleteNamespace", e))
        })
        .await;
        match r {
            Ok(o) => {
                wait_operation(aws, o.operation_id().unwrap_or_default(), poll_interval()).await?
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        tracing::info!(namespace = %rec.namespace_id, "Cloud Map namespace deleted");
    }
    if !rec.secret_arn.is_empty() {
        gone(
            aws.secrets
                .delete_secret()
                .secret_id(&rec.secret_arn)
                .force_delete_without_recovery(true)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("secretsmanager:DeleteSecret", e)),
        )?;
        tracing::info!("secret deleted");
    }
    if !rec.security_group_id.is_empty() {
        // The tasks' network interfaces linger for a while after their service is gone.
        gone(
            settle(Duration::from_secs(600), || async {
                aws.ec2
                    .call(
                        "DeleteSecurityGroup",
                        &[("GroupId".to_string(), rec.security_group_id.clone())],
                    )
                    .await
                    .map(|_| ())
            })
            .await,
        )?;
    }
    if !rec.log_group.is_empty() {
        gone(
            aws.logs
                .delete_log_group()
                .log_group_name(&rec.log_group)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("logs:DeleteLogGroup", e)),
        )?;
    }
    if rec.cluster_created {
        gone(
            settle(SETTLE, || async {
                aws.ecs
                    .delete_cluster()
                    .cluster(&rec.cluster)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("ecs:DeleteCluster", e))
            })
            .await,
        )
        .or_else(|e| match &e {
            // Other services (not ours) still run there: the cluster stays.
            AwsError::Invalid { code, .. } | AwsError::Other { code, .. }
                if code.contains("ClusterContainsServices")
                    || code.contains("ClusterContainsTasks") =>
            {
                Ok(())
            }
            _ => Err(e),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_never_runs_two_tasks() {
        let d = deployment();
        assert_eq!(
            (d.maximum_percent(), d.minimum_healthy_percent()),
            (Some(100), Some(0))
        );
    }
}
