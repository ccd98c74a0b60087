//! The EC2 boundary on the AWS SDK. Converts between Pacer's types and the SDK's, and every SDK
//! error into a classified [`CloudError`].

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types as ec2;
use futures::StreamExt as _;
use futures::future::BoxFuture;

use super::{
    CallObserver, CloudError, CloudResult, Ec2, ErrorClass, Image, Instance, InstanceTypeInfo,
    LaunchFailure, LaunchOutcome, LaunchRequest, LaunchTemplate, LaunchTemplateData, Observer,
    Pages, SecurityGroup, Subnet, tags,
};

/// EC2 and IAM through the AWS SDK.
#[derive(Clone)]
pub struct AwsEc2 {
    ec2: aws_sdk_ec2::Client,
    iam: aws_sdk_iam::Client,
    pricing: aws_sdk_pricing::Client,
    region: String,
    observer: Observer,
}

/// Where the SDK clients point and how they authenticate.
#[derive(Clone, Debug, Default)]
pub struct AwsSettings {
    pub region: String,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
}

/// Loads the SDK configuration from the default credential chain (environment, shared files,
/// IRSA web identity, EKS Pod Identity, IMDS), with adaptive retries for throttling.
pub async fn sdk_config(settings: &AwsSettings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(settings.region.clone()))
        .retry_config(aws_config::retry::RetryConfig::adaptive().with_max_attempts(5));
    if let Some(profile) = &settings.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(endpoint) = &settings.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

impl AwsEc2 {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        // Every request says it is Pacer's (`app/pacer` in the User-Agent) unless the config
        // names another app: CloudTrail and the test proxy tell Pacer's calls from others' by
        // it.
        let config = &match config.app_name() {
            Some(_) => config.clone(),
            None => {
                let app = aws_config::AppName::new("pacer").expect("a valid app name");
                config.to_builder().app_name(app).build()
            }
        };
        // The Pricing API is served from us-east-1 (and two other regions), whatever region
        // the instances run in.
        let pricing = aws_sdk_pricing::config::Builder::from(config)
            .region(aws_config::Region::new("us-east-1"))
            .build();
        Self {
            ec2: aws_sdk_ec2::Client::new(config),
            iam: aws_sdk_iam::Client::new(config),
            pricing: aws_sdk_pricing::Client::from_conf(pricing),
            region: config.region().map(|r| r.to_string()).unwrap_or_default(),
            observer: Observer::default(),
        }
    }

    /// The same adapter, telling `observer` of every call.
    pub fn observed_by(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Observer::new(observer);
        self
    }
}

/// Turns any SDK error into a classified one; transport failures count as `Other`.
fn classify_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    action: &'static str,
    err: SdkError<E, R>,
) -> CloudError {
    match &err {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            let code = inner.code().unwrap_or("Unknown").to_string();
            CloudError::new(action, code, inner.message().unwrap_or_default())
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CloudError {
                class: ErrorClass::Throttled,
                action,
                code: "Transport".into(),
                message: aws_smithy_error_text(&err),
            }
        }
        _ => CloudError {
            class: ErrorClass::Other,
            action,
            code: "Sdk".into(),
            message: aws_smithy_error_text(&err),
        },
    }
}

fn aws_smithy_error_text(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn ec2_tags(tags: &BTreeMap<String, String>) -> Vec<ec2::Tag> {
    tags.iter()
        .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(resource: ec2::ResourceType, tags: &BTreeMap<String, String>) -> ec2::TagSpecification {
    ec2::TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(ec2_tags(tags)))
        .build()
}

fn template_data(data: &LaunchTemplateData) -> ec2::RequestLaunchTemplateData {
    let tags = |resource| {
        ec2::LaunchTemplateTagSpecificationRequest::builder()
            .resource_type(resource)
            .set_tags(Some(ec2_tags(&data.tags)))
            .build()
    };
    let mut builder = ec2::RequestLaunchTemplateData::builder()
        .image_id(&data.image_id)
        .set_security_group_ids(Some(data.security_group_ids.clone()))
        .metadata_options(
            ec2::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_endpoint(ec2::LaunchTemplateInstanceMetadataEndpointState::Enabled)
                .http_tokens(ec2::LaunchTemplateHttpTokensState::Required)
                .http_put_response_hop_limit(data.metadata_hop_limit)
                .build(),
        )
        .instance_initiated_shutdown_behavior(ec2::ShutdownBehavior::Terminate)
        .user_data(&data.user_data)
        .tag_specifications(tags(ec2::ResourceType::Instance))
        .tag_specifications(tags(ec2::ResourceType::Volume));
    if let Some(profile) = &data.instance_profile {
        builder = builder.iam_instance_profile(
            ec2::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .name(profile)
                .build(),
        );
    }
    if let Some(volume) = &data.root_volume {
        let ebs = ec2::LaunchTemplateEbsBlockDeviceRequest::builder()
            .set_volume_size(volume.size_gib)
            .volume_type(ec2::VolumeType::from(volume.volume_type.as_str()))
            .set_iops(volume.iops)
            .set_throughput(volume.throughput)
            .encrypted(true)
            .delete_on_termination(true)
            .build();
        builder = builder.block_device_mappings(
            ec2::LaunchTemplateBlockDeviceMappingRequest::builder()
                .device_name(&volume.device_name)
                .ebs(ebs)
                .build(),
        );
    }
    if data.spot {
        builder = builder.instance_market_options(
            ec2::LaunchTemplateInstanceMarketOptionsRequest::builder()
                .market_type(ec2::MarketType::Spot)
                .spot_options(
                    ec2::LaunchTemplateSpotMarketOptionsRequest::builder()
                        .spot_instance_type(ec2::SpotInstanceType::OneTime)
                        .instance_interruption_behavior(
                            ec2::InstanceInterruptionBehavior::Terminate,
                        )
                        .build(),
                )
                .build(),
        );
    }
    builder.build()
}

fn launch_template(lt: &ec2::LaunchTemplate) -> LaunchTemplate {
    LaunchTemplate {
        id: lt.launch_template_id().unwrap_or_default().to_string(),
        name: lt.launch_template_name().unwrap_or_default().to_string(),
        default_version: lt.default_version_number().unwrap_or_default(),
        latest_version: lt.latest_version_number().unwrap_or_default(),
        tags: lt
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().into(),
                    t.value().unwrap_or_default().into(),
                )
            })
            .collect(),
        created: lt.create_time().map(|t| t.secs()),
    }
}

/// A filter on one tag's value.
fn tag_filter(key: &str, value: &str) -> ec2::Filter {
    ec2::Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// A DryRun that would have succeeded answers with the error code `DryRunOperation`.
fn dry_run_outcome(err: CloudError) -> CloudResult<()> {
    if err.code == "DryRunOperation" {
        Ok(())
    } else {
        Err(err)
    }
}

impl Ec2 for AwsEc2 {
    fn describe_images<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<Vec<Image>>> {
        self.observer.observe("DescribeImages", async move {
            let out = self
                .ec2
                .describe_images()
                .set_image_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| classify_sdk("DescribeImages", e))?;
            Ok(out
                .images()
                .iter()
                .map(|image| {
                    let root = image.root_device_name().map(str::to_string);
                    let root_snapshot_gib = image
                        .block_device_mappings()
                        .iter()
                        .find(|m| m.device_name() == root.as_deref())
                        .and_then(|m| m.ebs())
                        .and_then(|ebs| ebs.volume_size());
                    Image {
                        id: image.image_id().unwrap_or_default().to_string(),
                        architecture: image
                            .architecture()
                            .map(|a| a.as_str().to_string())
                            .unwrap_or_default(),
                        root_device_name: root,
                        root_snapshot_gib,
                        ebs_backed: image.root_device_type()
                            != Some(&ec2::DeviceType::InstanceStore),
                    }
                })
                .collect())
        })
    }

    fn describe_subnets<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<Subnet>>> {
        self.observer.observe("DescribeSubnets", async move {
            let out = self
                .ec2
                .describe_subnets()
                .set_subnet_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| classify_sdk("DescribeSubnets", e))?;
            Ok(out
                .subnets()
                .iter()
                .map(|s| Subnet {
                    id: s.subnet_id().unwrap_or_default().into(),
                    vpc_id: s.vpc_id().unwrap_or_default().into(),
                    zone: s.availability_zone().unwrap_or_default().into(),
                })
                .collect())
        })
    }

    fn describe_security_groups<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<SecurityGroup>>> {
        self.observer.observe("DescribeSecurityGroups", async move {
            let out = self
                .ec2
                .describe_security_groups()
                .set_group_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| classify_sdk("DescribeSecurityGroups", e))?;
            Ok(out
                .security_groups()
                .iter()
                .map(|g| SecurityGroup {
                    id: g.group_id().unwrap_or_default().into(),
                    vpc_id: g.vpc_id().unwrap_or_default().into(),
                })
                .collect())
        })
    }

    fn describe_instance_types<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<InstanceTypeInfo>>> {
        self.observer.observe("DescribeInstanceTypes", async move {
            let out = self
                .ec2
                .describe_instance_types()
                .set_instance_types(Some(
                    names
                        .iter()
                        .map(|n| ec2::InstanceType::from(n.as_str()))
                        .collect(),
                ))
                .send()
                .await
                .map_err(|e| classify_sdk("DescribeInstanceTypes", e))?;
            Ok(out
                .instance_types()
                .iter()
                .map(|t| InstanceTypeInfo {
                    name: t
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    architectures: t
                        .processor_info()
                        .map(|p| {
                            p.supported_architectures()
                                .iter()
                                .map(|a| a.as_str().to_string())
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect())
        })
    }

    fn instance_profile_roles<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<Vec<String>>>> {
        self.observer.observe("GetInstanceProfile", async move {
            match self
                .iam
                .get_instance_profile()
                .instance_profile_name(name)
                .send()
                .await
            {
                Ok(out) => Ok(out.instance_profile().map(|p| {
                    p.roles()
                        .iter()
                        .map(|r| r.role_name().to_string())
                        .collect()
                })),
                Err(err) => {
                    let err = classify_sdk("GetInstanceProfile", err);
                    if err.is(ErrorClass::NotFound) {
                        Ok(None)
                    } else {
                        Err(err)
                    }
                }
            }
        })
    }

    fn find_launch_template<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<LaunchTemplate>>> {
        self.observer
            .observe("DescribeLaunchTemplates", async move {
                match self
                    .ec2
                    .describe_launch_templates()
                    .launch_template_names(name)
                    .send()
                    .await
                {
                    Ok(out) => Ok(out.launch_templates().first().map(launch_template)),
                    Err(err) => {
                        let err = classify_sdk("DescribeLaunchTemplates", err);
                        if err.is(ErrorClass::NotFound) {
                            Ok(None)
                        } else {
                            Err(err)
                        }
                    }
                }
            })
    }

    fn describe_managed_launch_templates<'a>(
        &'a self,
        controller_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Vec<LaunchTemplate>>> {
        self.observer
            .observe("DescribeLaunchTemplates", async move {
                let mut pages = self
                    .ec2
                    .describe_launch_templates()
                    .filters(tag_filter(tags::MANAGED_BY, tags::MANAGED_BY_VALUE))
                    .filters(tag_filter(tags::CONTROLLER, controller_id))
                    .max_results(200)
                    .into_paginator()
                    .send();
                let mut templates = Vec::new();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| classify_sdk("DescribeLaunchTemplates", e))?;
                    templates.extend(page.launch_templates().iter().map(launch_template));
                }
                Ok(templates)
            })
    }

    fn default_version_description<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.observer
            .observe("DescribeLaunchTemplateVersions", async move {
                let out = self
                    .ec2
                    .describe_launch_template_versions()
                    .launch_template_id(id)
                    .versions("$Default")
                    .send()
                    .await
                    .map_err(|e| classify_sdk("DescribeLaunchTemplateVersions", e))?;
                Ok(out
                    .launch_template_versions()
                    .first()
                    .and_then(|v| v.version_description())
                    .map(str::to_string))
            })
    }

    fn create_launch_template<'a>(
        &'a self,
        name: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, CloudResult<LaunchTemplate>> {
        self.observer.observe("CreateLaunchTemplate", async move {
            let out = self
                .ec2
                .create_launch_template()
                .launch_template_name(name)
                .version_description(description)
                .launch_template_data(template_data(data))
                .tag_specifications(tag_spec(ec2::ResourceType::LaunchTemplate, tags))
                .send()
                .await
                .map_err(|e| classify_sdk("CreateLaunchTemplate", e))?;
            out.launch_template().map(launch_template).ok_or_else(|| {
                CloudError::new(
                    "CreateLaunchTemplate",
                    "EmptyResponse",
                    "no launch template in the answer",
                )
            })
        })
    }

    fn create_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
    ) -> BoxFuture<'a, CloudResult<i64>> {
        self.observer
            .observe("CreateLaunchTemplateVersion", async move {
                let out = self
                    .ec2
                    .create_launch_template_version()
                    .launch_template_id(id)
                    .version_description(description)
                    .launch_template_data(template_data(data))
                    .send()
                    .await
                    .map_err(|e| classify_sdk("CreateLaunchTemplateVersion", e))?;
                out.launch_template_version()
                    .and_then(|v| v.version_number())
                    .ok_or_else(|| {
                        CloudError::new(
                            "CreateLaunchTemplateVersion",
                            "EmptyResponse",
                            "no version number in the answer",
                        )
                    })
            })
    }

    fn set_default_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        version: i64,
    ) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe("ModifyLaunchTemplate", async move {
            self.ec2
                .modify_launch_template()
                .launch_template_id(id)
                .default_version(version.to_string())
                .send()
                .await
                .map_err(|e| classify_sdk("ModifyLaunchTemplate", e))?;
            Ok(())
        })
    }

    fn delete_launch_template_versions<'a>(
        &'a self,
        id: &'a str,
        versions: &'a [i64],
    ) -> BoxFuture<'a, CloudResult<()>> {
        self.observer
            .observe("DeleteLaunchTemplateVersions", async move {
                self.ec2
                    .delete_launch_template_versions()
                    .launch_template_id(id)
                    .set_versions(Some(versions.iter().map(i64::to_string).collect()))
                    .send()
                    .await
                    .map_err(|e| classify_sdk("DeleteLaunchTemplateVersions", e))?;
                Ok(())
            })
    }

    fn delete_launch_template<'a>(&'a self, id: &'a str) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe("DeleteLaunchTemplate", async move {
            match self
                .ec2
                .delete_launch_template()
                .launch_template_id(id)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(err) => {
                    let err = classify_sdk("DeleteLaunchTemplate", err);
                    if err.is(ErrorClass::NotFound) {
                        Ok(())
                    } else {
                        Err(err)
                    }
                }
            }
        })
    }

    fn dry_run_launch<'a>(&'a self, request: &'a LaunchRequest) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe(
            if request.fleet {
                "DryRunCreateFleet"
            } else {
                "DryRunRunInstances"
            },
            async move {
                let result = if request.fleet {
                    self.fleet(request)
                        .dry_run(true)
                        .send()
                        .await
                        .map(drop)
                        .map_err(|e| classify_sdk("CreateFleet", e))
                } else {
                    self.run(request)
                        .dry_run(true)
                        .send()
                        .await
                        .map(drop)
                        .map_err(|e| classify_sdk("RunInstances", e))
                };
                result.or_else(dry_run_outcome)
            },
        )
    }

    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, CloudResult<LaunchOutcome>> {
        self.observer.observe(
            if request.fleet {
                "CreateFleet"
            } else {
                "RunInstances"
            },
            async move {
                if request.fleet {
                    let out = self
                        .fleet(request)
                        .send()
                        .await
                        .map_err(|e| classify_sdk("CreateFleet", e))?;
                    let instances = out
                        .instances()
                        .iter()
                        .flat_map(|group| {
                            let overrides = group
                                .launch_template_and_overrides()
                                .and_then(|l| l.overrides());
                            let zone = overrides
                                .and_then(|o| o.availability_zone())
                                .unwrap_or_default()
                                .to_string();
                            let instance_type = group
                                .instance_type()
                                .map(|t| t.as_str().to_string())
                                .unwrap_or_default();
                            let spot = group.lifecycle().is_some_and(|l| l.as_str() == "spot");
                            group.instance_ids().iter().map(move |id| Instance {
                                id: id.clone(),
                                instance_type: instance_type.clone(),
                                zone: zone.clone(),
                                spot,
                                state: "pending".into(),
                                state_reason: None,
                                launch_time: None,
                                tags: request.tags.clone(),
                            })
                        })
                        .collect();
                    let failures = out
                        .errors()
                        .iter()
                        .map(|e| {
                            let overrides = e
                                .launch_template_and_overrides()
                                .and_then(|l| l.overrides());
                            LaunchFailure {
                                instance_type: overrides
                                    .and_then(|o| o.instance_type())
                                    .map(|t| t.as_str().to_string()),
                                subnet: overrides.and_then(|o| o.subnet_id()).map(str::to_string),
                                spot: e.lifecycle().is_some_and(|l| l.as_str() == "spot"),
                                error: CloudError::new(
                                    "CreateFleet",
                                    e.error_code().unwrap_or("Unknown"),
                                    e.error_message().unwrap_or_default(),
                                ),
                            }
                        })
                        .collect();
                    Ok(LaunchOutcome {
                        instances,
                        failures,
                    })
                } else {
                    let out = self
                        .run(request)
                        .send()
                        .await
                        .map_err(|e| classify_sdk("RunInstances", e))?;
                    Ok(LaunchOutcome {
                        instances: out.instances().iter().map(instance).collect(),
                        failures: Vec::new(),
                    })
                }
            },
        )
    }

    fn managed_instance_pages<'a>(&'a self, controller_id: &'a str) -> Pages<'a, Instance> {
        let pages = self
            .ec2
            .describe_instances()
            .filters(tag_filter(tags::MANAGED_BY, tags::MANAGED_BY_VALUE))
            .filters(tag_filter(tags::CONTROLLER, controller_id))
            .max_results(1000)
            .into_paginator()
            .send();
        let pages = futures::stream::unfold(pages, |mut pages| async move {
            let page = pages.next().await?.map(|page| {
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .map(instance)
                    .map(|mut i| {
                        i.tags.retain(|k, _| k.starts_with(tags::PREFIX));
                        i
                    })
                    .collect()
            });
            Some((
                page.map_err(|e| classify_sdk("DescribeInstances", e)),
                pages,
            ))
        });
        self.observer
            .observe_pages("DescribeInstances", pages.boxed())
    }

    fn managed_instance<'a>(
        &'a self,
        controller_id: &'a str,
        instance_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<(Instance, String)>>> {
        self.observer.observe("DescribeInstances", async move {
            let answer = self
                .ec2
                .describe_instances()
                .instance_ids(instance_id)
                .filters(tag_filter(tags::MANAGED_BY, tags::MANAGED_BY_VALUE))
                .filters(tag_filter(tags::CONTROLLER, controller_id))
                .send()
                .await
                .map_err(|e| classify_sdk("DescribeInstances", e));
            let out = match answer {
                Ok(out) => out,
                Err(e) if e.class == ErrorClass::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            Ok(out.reservations().iter().find_map(|r| {
                let owner = r.owner_id()?.to_string();
                r.instances()
                    .iter()
                    .find(|i| i.instance_id() == Some(instance_id))
                    .map(|i| (instance(i), owner))
            }))
        })
    }

    fn on_demand_price<'a>(
        &'a self,
        instance_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.observer.observe("GetProducts", async move {
            let term = price_term;
            let out = self
                .pricing
                .get_products()
                .service_code("AmazonEC2")
                .filters(term("instanceType", instance_type))
                .filters(term("regionCode", &self.region))
                .filters(term("operatingSystem", "Linux"))
                .filters(term("tenancy", "Shared"))
                .filters(term("preInstalledSw", "NA"))
                .filters(term("capacitystatus", "Used"))
                .max_results(1)
                .send()
                .await
                .map_err(|e| classify_sdk("GetProducts", e))?;
            Ok(out.price_list().first().and_then(|doc| on_demand_usd(doc)))
        })
    }

    fn volume_price<'a>(
        &'a self,
        volume_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.observer.observe("GetProducts", async move {
            let out = self
                .pricing
                .get_products()
                .service_code("AmazonEC2")
                .filters(price_term("productFamily", "Storage"))
                .filters(price_term("volumeApiName", volume_type))
                .filters(price_term("regionCode", &self.region))
                .max_results(1)
                .send()
                .await
                .map_err(|e| classify_sdk("GetProducts", e))?;
            Ok(out.price_list().first().and_then(|doc| on_demand_usd(doc)))
        })
    }

    fn spot_price<'a>(
        &'a self,
        instance_type: &'a str,
        zone: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.observer
            .observe("DescribeSpotPriceHistory", async move {
                let out = self
                    .ec2
                    .describe_spot_price_history()
                    .instance_types(ec2::InstanceType::from(instance_type))
                    .availability_zone(zone)
                    .product_descriptions("Linux/UNIX")
                    .start_time(aws_sdk_ec2::primitives::DateTime::from(
                        std::time::SystemTime::now(),
                    ))
                    .send()
                    .await
                    .map_err(|e| classify_sdk("DescribeSpotPriceHistory", e))?;
                Ok(out
                    .spot_price_history()
                    .first()
                    .and_then(|p| p.spot_price())
                    .map(str::to_string))
            })
    }

    fn terminate_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe("TerminateInstances", async move {
            match self
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(err) => {
                    let err = classify_sdk("TerminateInstances", err);
                    // One unknown id of several fails the call whole: nothing was terminated.
                    if err.is(ErrorClass::NotFound) && ids.len() == 1 {
                        Ok(())
                    } else {
                        Err(err)
                    }
                }
            }
        })
    }

    fn stop_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe("StopInstances", async move {
            self.ec2
                .stop_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
                .map(drop)
                .map_err(|e| classify_sdk("StopInstances", e))
        })
    }

    fn start_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.observer.observe("StartInstances", async move {
            self.ec2
                .start_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
                .map(drop)
                .map_err(|e| classify_sdk("StartInstances", e))
        })
    }
}

impl AwsEc2 {
    /// CreateFleet (instant, `count` instances) over the request's offerings, tagged in the
    /// request.
    fn fleet(
        &self,
        request: &LaunchRequest,
    ) -> aws_sdk_ec2::operation::create_fleet::builders::CreateFleetFluentBuilder {
        let spec = ec2::FleetLaunchTemplateSpecificationRequest::builder()
            .launch_template_id(&request.launch_template_id)
            .version(request.version.to_string())
            .build();
        let overrides = request
            .offerings
            .iter()
            .enumerate()
            .map(|(i, (instance_type, subnet))| {
                ec2::FleetLaunchTemplateOverridesRequest::builder()
                    .instance_type(ec2::InstanceType::from(instance_type.as_str()))
                    .subnet_id(subnet)
                    .priority(i as f64)
                    .build()
            });
        let market = if request.spot {
            ec2::DefaultTargetCapacityType::Spot
        } else {
            ec2::DefaultTargetCapacityType::OnDemand
        };
        let mut builder = self.ec2.create_fleet();
        if let Some(strategy) = request.allocation_strategy.as_deref() {
            builder = if request.spot {
                builder.spot_options(
                    ec2::SpotOptionsRequest::builder()
                        .allocation_strategy(ec2::SpotAllocationStrategy::from(strategy))
                        .build(),
                )
            } else {
                builder.on_demand_options(
                    ec2::OnDemandOptionsRequest::builder()
                        .allocation_strategy(ec2::FleetOnDemandAllocationStrategy::from(strategy))
                        .build(),
                )
            };
        }
        builder
            .r#type(ec2::FleetType::Instant)
            .set_client_token(request.client_token.clone())
            .launch_template_configs(
                ec2::FleetLaunchTemplateConfigRequest::builder()
                    .launch_template_specification(spec)
                    .set_overrides(Some(overrides.collect()))
                    .build(),
            )
            .target_capacity_specification(
                ec2::TargetCapacitySpecificationRequest::builder()
                    .total_target_capacity(request.count.max(1) as i32)
                    .default_target_capacity_type(market)
                    .build(),
            )
            .tag_specifications(tag_spec(ec2::ResourceType::Instance, &request.tags))
            .tag_specifications(tag_spec(ec2::ResourceType::Volume, &request.tags))
            .tag_specifications(tag_spec(ec2::ResourceType::Fleet, &request.tags))
    }

    /// RunInstances of up to `count` instances (at least one, or none) in the request's first
    /// offering, tagged in the request.
    fn run(
        &self,
        request: &LaunchRequest,
    ) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
        let (instance_type, subnet) = request.offerings.first().cloned().unwrap_or_default();
        let mut builder = self
            .ec2
            .run_instances()
            .min_count(1)
            .max_count(request.count.max(1) as i32)
            .set_client_token(request.client_token.clone())
            .launch_template(
                ec2::LaunchTemplateSpecification::builder()
                    .launch_template_id(&request.launch_template_id)
                    .version(request.version.to_string())
                    .build(),
            )
            .instance_type(ec2::InstanceType::from(instance_type.as_str()))
            .subnet_id(subnet)
            .tag_specifications(tag_spec(ec2::ResourceType::Instance, &request.tags))
            .tag_specifications(tag_spec(ec2::ResourceType::Volume, &request.tags));
        if request.spot {
            builder = builder.instance_market_options(
                ec2::InstanceMarketOptionsRequest::builder()
                    .market_type(ec2::MarketType::Spot)
                    .spot_options(
                        ec2::SpotMarketOptions::builder()
                            .spot_instance_type(ec2::SpotInstanceType::OneTime)
                            .instance_interruption_behavior(
                                ec2::InstanceInterruptionBehavior::Terminate,
                            )
                            .build(),
                    )
                    .build(),
            );
        }
        builder
    }
}

/// A Pricing filter: `field` is `value` exactly.
fn price_term(field: &str, value: &str) -> aws_sdk_pricing::types::Filter {
    use aws_sdk_pricing::types::{Filter, FilterType};
    Filter::builder()
        .r#type(FilterType::TermMatch)
        .field(field)
        .value(value)
        .build()
        .expect("all fields set")
}

/// The USD price per unit (an hour, a GB-month) in one Price List product document.
fn on_demand_usd(document: &str) -> Option<String> {
    let product: serde_json::Value = serde_json::from_str(document).ok()?;
    let term = product
        .pointer("/terms/OnDemand")?
        .as_object()?
        .values()
        .next()?;
    let dimension = term.get("priceDimensions")?.as_object()?.values().next()?;
    dimension
        .pointer("/pricePerUnit/USD")?
        .as_str()
        .map(str::to_string)
}

fn instance(i: &ec2::Instance) -> Instance {
    Instance {
        id: i.instance_id().unwrap_or_default().to_string(),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string(),
        spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        state_reason: i
            .state_reason()
            .and_then(|r| r.message())
            .map(str::to_string),
        launch_time: i.launch_time().map(|t| t.secs()),
        tags: i
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().into(),
                    t.value().unwrap_or_default().into(),
                )
            })
            .collect(),
    }
}
